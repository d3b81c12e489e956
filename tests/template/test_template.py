"""template.yaml as `sam deploy` renders it: the SAM translator (the
library sam itself uses) turns it into CloudFormation for a set of
parameter sets that together cover every value at least once, cfn-lint
checks every render, and the tests assert what a working deploy needs.

Run by `make test` (`pytest tests/template`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import deploy_params  # noqa: E402

os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
from samtranslator.translator.transform import transform  # noqa: E402
from samtranslator.yaml_helper import yaml_parse  # noqa: E402

SECRET = "arn:aws:secretsmanager:us-east-1:123456789012:secret:anthropic-AbCdEf"
VPC = {"SubnetIds": "subnet-0a,subnet-0b", "SecurityGroupIds": "sg-0a"}


def samconfig_params(env):
    merged = deploy_params.merged(env, "")
    return dict(kv.split("=", 1) for kv in merged.split())


# About eight renders, not the cross product: together they use every
# value of every parameter that changes the template's shape.
SETS = {
    "samconfig-default": samconfig_params("default"),
    "samconfig-prod": samconfig_params("prod"),
    "redis-in-vpc": {"CacheBackend": "redis", **VPC},
    "redis-by-url": {"CacheBackend": "redis", "RedisUrl": "rediss://cache.example:6379", "RedisClusterMode": "true"},
    "no-cache": {"CacheBackend": "none", "ProvisionedConcurrency": "2", "ReservedConcurrency": "10"},
    "dynamodb-in-vpc": {"CacheBackend": "dynamodb", **VPC, "AlarmTopicArn": "arn:aws:sns:us-east-1:123456789012:alarms"},
    "iam-auth": {
        "FunctionUrlAuthType": "AWS_IAM",
        "BedrockEnabled": "true",
        "BedrockModelArns": "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-3-5-haiku-20241022-v1:0",
        "OpenAiApiKeySecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:openai-AbCdEf",
        "ApiKeyHashesSecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:keys-AbCdEf",
    },
    "with-code-sha": {"CodeSha256": "0123456789abcdef" * 4},
    "cognito": {"AuthMode": "api_key,jwt", "CognitoUserPoolId": "us-east-1_AbC123", "CognitoClientId": "app-client-1"},
    "oidc-issuer": {"AuthMode": "jwt", "JwtIssuer": "https://login.example.com/", "JwtAudience": "chat-api"},
}


class NoManagedPolicies:
    def load(self):
        return {}


def source():
    t = yaml_parse((ROOT / "template.yaml").read_text())
    # What `sam package` does: code in S3.
    for name, r in t["Resources"].items():
        if r["Type"] == "AWS::Serverless::Function":
            r["Properties"]["CodeUri"] = f"s3://bucket/{name}.zip"
    return t


def params_of(extra):
    p = {"AnthropicApiKeySecretArn": SECRET}
    p.update(extra)
    return p


def render(extra):
    return transform(source(), params_of(extra), NoManagedPolicies())


RENDERS = {name: render(p) for name, p in SETS.items()}


# --- a small evaluator of the conditions and intrinsics in a render --------

def defaults(t):
    return {k: str(v.get("Default", "")) for k, v in t["Parameters"].items()}


def values(t, extra):
    v = defaults(t)
    v.update({k: str(x) for k, x in params_of(extra).items()})
    return v


def ev(x, t, p):
    """Evaluates the intrinsics conditions and rules use."""
    if isinstance(x, dict) and len(x) == 1:
        (k, a), = x.items()
        if k == "Ref":
            if t["Parameters"].get(a, {}).get("Type", "").startswith("List") or t["Parameters"].get(a, {}).get("Type") == "CommaDelimitedList":
                return [s for s in p[a].split(",") if s]
            return p.get(a, a)
        if k == "Fn::Equals":
            return str(ev(a[0], t, p)) == str(ev(a[1], t, p))
        if k == "Fn::Not":
            return not ev(a[0], t, p)
        if k == "Fn::And":
            return all(ev(c, t, p) for c in a)
        if k == "Fn::Or":
            return any(ev(c, t, p) for c in a)
        if k == "Condition":
            return ev(t["Conditions"][a], t, p)
        if k == "Fn::Join":
            return a[0].join(str(s) for s in ev(a[1], t, p))
        if k == "Fn::Contains":
            return str(ev(a[1], t, p)) in [str(s) for s in ev(a[0], t, p)]
    if isinstance(x, list):
        return [ev(i, t, p) for i in x]
    return x


def active(name):
    """The resources of a render that exist with its parameters."""
    t, p = RENDERS[name], values(RENDERS[name], SETS[name])
    return {
        k: r
        for k, r in t["Resources"].items()
        if "Condition" not in r or ev({"Condition": r["Condition"]}, t, p)
    }


def resolve_ifs(x, t, p):
    """Takes the branch of every Fn::If; drops AWS::NoValue."""
    if isinstance(x, dict):
        if set(x) == {"Fn::If"}:
            c, a, b = x["Fn::If"]
            return resolve_ifs(a if ev({"Condition": c}, t, p) else b, t, p)
        out = {}
        for k, v in x.items():
            v = resolve_ifs(v, t, p)
            if v != {"Ref": "AWS::NoValue"}:
                out[k] = v
        return out
    if isinstance(x, list):
        return [resolve_ifs(i, t, p) for i in x if resolve_ifs(i, t, p) != {"Ref": "AWS::NoValue"}]
    return x


def resolved(name):
    t, p = RENDERS[name], values(RENDERS[name], SETS[name])
    return {k: resolve_ifs(r, t, p) for k, r in active(name).items()}


# --- the tests --------------------------------------------------------------

def test_cfn_lint_passes_every_render(tmp_path):
    files = []
    for name, t in RENDERS.items():
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(t))
        files.append(str(f))
    r = subprocess.run(
        [str(Path(sys.executable).parent / "cfn-lint"), *files, "--non-zero-exit-code", "error", "--regions", "us-east-1"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", SETS)
def test_the_url_targets_the_alias_and_is_public_exactly_when_auth_is_none(name):
    res = resolved(name)
    url = res["ChatStreamFunctionUrl"]["Properties"]
    assert url["TargetFunctionArn"] == {"Ref": "ChatStreamFunctionAliaslive"}
    public = values(RENDERS[name], SETS[name])["FunctionUrlAuthType"] == "NONE"
    perms = [r["Properties"] for r in res.values() if r["Type"] == "AWS::Lambda::Permission"
             and r["Properties"]["FunctionName"] == {"Ref": "ChatStreamFunctionAliaslive"}]
    url_perm = [q for q in perms if q["Action"] == "lambda:InvokeFunctionUrl"
                and q["Principal"] == "*" and q.get("FunctionUrlAuthType") == "NONE"]
    invoke_perm = [q for q in perms if q["Action"] == "lambda:InvokeFunction"
                   and q["Principal"] == "*" and q.get("InvokedViaFunctionUrl") is True]
    if public:
        assert len(url_perm) == 1 and len(invoke_perm) == 1, perms
    else:
        assert not url_perm and not invoke_perm, perms


def test_a_new_code_sha_publishes_a_new_version():
    def version(sha):
        t = render({"CodeSha256": sha})
        return [k for k, r in t["Resources"].items() if r["Type"] == "AWS::Lambda::Version"]
    a, b = version("a" * 64), version("b" * 64)
    assert len(a) == 1 and len(b) == 1 and a != b


def test_make_deploy_merges_params_with_the_environment_and_hashes_them(tmp_path):
    merged = deploy_params.merged("prod", "AnthropicApiKeySecretArn=" + SECRET + " LogLevel=debug")
    kv = dict(x.split("=", 1) for x in merged.split())
    # prod's own values survive; PARAMS adds and overrides.
    assert kv["MemorySize"] == "1024" and kv["ProvisionedConcurrency"] == "2"
    assert kv["AnthropicApiKeySecretArn"] == SECRET and kv["LogLevel"] == "debug"
    boot = tmp_path / "chat-stream"
    boot.mkdir()
    (boot / "bootstrap").write_bytes(b"binary one")
    one = deploy_params.code_sha(tmp_path, merged)
    assert one == deploy_params.code_sha(tmp_path, merged), "stable"
    assert one != deploy_params.code_sha(tmp_path, merged.replace("MemorySize=1024", "MemorySize=2048"))
    (boot / "bootstrap").write_bytes(b"binary two")
    assert one != deploy_params.code_sha(tmp_path, merged)


def test_the_created_serverless_cache_is_talked_to_as_a_cluster():
    def cluster(name):
        t, p = RENDERS[name], values(RENDERS[name], SETS[name])
        return ev(resolved(name)["ChatStreamFunction"]["Properties"]["Environment"]["Variables"]["REDIS_CLUSTER"], t, p)
    assert cluster("redis-in-vpc") == "true"
    assert cluster("redis-by-url") == "true"
    assert cluster("samconfig-default") == "false"


def test_reserved_concurrency_is_a_parameter():
    t, p = RENDERS["no-cache"], values(RENDERS["no-cache"], SETS["no-cache"])
    reserved = resolved("no-cache")["ChatStreamFunction"]["Properties"]["ReservedConcurrentExecutions"]
    assert ev(reserved, t, p) == "10"
    assert "ReservedConcurrentExecutions" not in resolved("samconfig-default")["ChatStreamFunction"]["Properties"]


def test_cors_matches_the_api_list():
    api = json.loads((ROOT / "crates/chat-core/src/api/cors.json").read_text())
    for name in SETS:
        cors = resolved(name)["ChatStreamFunctionUrl"]["Properties"]["Cors"]
        assert cors["AllowMethods"] == api["allow_methods"]
        assert cors["AllowHeaders"] == api["allow_headers"]
        assert cors["ExposeHeaders"] == api["expose_headers"]
        assert cors["MaxAge"] == api["max_age"]


# Least privilege: every action each function's role may take, on what.
# A change that needs a permission extends this list on purpose.
ALLOWED = {
    "ChatStreamFunctionRole": {
        ("secretsmanager:GetSecretValue", "param:AnthropicApiKeySecretArn"),
        ("secretsmanager:GetSecretValue", "param:OpenAiApiKeySecretArn"),
        ("secretsmanager:GetSecretValue", "param:ApiKeyHashesSecretArn"),
        # The stack's own pseudonym key (the secret's Ref is its ARN).
        ("secretsmanager:GetSecretValue", "param:LogUserKeySecret"),
        *{(a, r) for a in ("dynamodb:GetItem", "dynamodb:Query", "dynamodb:PutItem",
                           "dynamodb:UpdateItem", "dynamodb:BatchWriteItem")
          for r in ("ChatTable.Arn", "ChatTable.Arn/index/GSI1")},
        ("sqs:SendMessage", "TurnQueue.Arn"),
        ("bedrock:InvokeModelWithResponseStream", "param:BedrockModelArns"),
        ("bedrock:InvokeModelWithResponseStream", "inference-profile/*"),
    },
    "DbWriterFunctionRole": {
        ("dynamodb:PutItem", "ChatTable.Arn"),
        ("dynamodb:UpdateItem", "ChatTable.Arn"),
        ("dynamodb:BatchWriteItem", "ChatTable.Arn"),
        ("sqs:ReceiveMessage", "TurnQueue.Arn"),
        ("sqs:DeleteMessage", "TurnQueue.Arn"),
        ("sqs:GetQueueAttributes", "TurnQueue.Arn"),
        ("sqs:ChangeMessageVisibility", "TurnQueue.Arn"),
    },
    "CacheWarmerFunctionRole": {
        ("secretsmanager:GetSecretValue", "param:AnthropicApiKeySecretArn"),
        ("secretsmanager:GetSecretValue", "param:OpenAiApiKeySecretArn"),
        ("dynamodb:GetItem", "ChatTable.Arn"),
        ("dynamodb:PutItem", "ChatTable.Arn"),
        ("bedrock:InvokeModelWithResponseStream", "param:BedrockModelArns"),
        ("bedrock:InvokeModelWithResponseStream", "inference-profile/*"),
    },
}
MANAGED = {
    "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",
    "arn:aws:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole",
    # Tracing: Active (PutTraceSegments and PutTelemetryRecords only).
    "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess",
}


def shape(r):
    """A resource of a statement as a short, comparable name."""
    if isinstance(r, str):
        return r
    if "Fn::GetAtt" in r:
        return ".".join(r["Fn::GetAtt"])
    if "Ref" in r:
        return "param:" + r["Ref"]
    if "Fn::Sub" in r:
        s = r["Fn::Sub"] if isinstance(r["Fn::Sub"], str) else r["Fn::Sub"][0]
        if s.startswith("${ChatTable.Arn}"):
            return "ChatTable.Arn" + s[len("${ChatTable.Arn}"):]
        if s.endswith("inference-profile/*"):
            return "inference-profile/*"
        return s
    return json.dumps(r)


def grants(role):
    out = set()
    for pol in role["Properties"].get("Policies", []):
        for st in pol["PolicyDocument"]["Statement"]:
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            res = st["Resource"]
            res = res if isinstance(res, list) else [res]
            for a in actions:
                for r in res:
                    for one in (r if isinstance(r, list) else [r]):
                        out.add((a, shape(one)))
    return out


@pytest.mark.parametrize("name", SETS)
def test_each_function_has_only_the_permissions_on_its_list(name):
    res = resolved(name)
    for role_name, allowed in ALLOWED.items():
        if role_name not in res:
            continue
        role = res[role_name]
        extra = grants(role) - allowed
        assert not extra, f"{role_name} in {name}: not on the allowlist: {extra}"
        for arn in role["Properties"].get("ManagedPolicyArns", []):
            s = arn["Fn::Sub"] if isinstance(arn, dict) else arn
            assert s in MANAGED, f"{role_name}: managed policy {arn}"
    assert not any(a == "dynamodb:*" or a.endswith(":*") for role in ALLOWED.values() for a, _ in role)


def rules_pass(extra):
    t = source()
    p = values(t, extra)
    failed = []
    for name, rule in t.get("Rules", {}).items():
        if "RuleCondition" in rule and not ev(rule["RuleCondition"], t, p):
            continue
        for a in rule["Assertions"]:
            if not ev(a["Assert"], t, p):
                failed.append(name)
    return failed


def test_rules_refuse_inconsistent_parameters_before_anything_is_created():
    assert rules_pass({}) == []
    for name, extra in SETS.items():
        assert rules_pass(extra) == [], name
    assert rules_pass({"SubnetIds": "subnet-0a"}) == ["SubnetsNeedSecurityGroups"]
    assert rules_pass({"SecurityGroupIds": "sg-0a"}) == ["SecurityGroupsNeedSubnets"]
    assert rules_pass({"CacheBackend": "redis"}) == ["RedisCacheNeedsAVpcOrAUrl"]
    assert rules_pass({"DbWriterBatchingWindowSeconds": "0", "DbWriterBatchSize": "100"}) == ["LargeBatchesNeedABatchingWindow"]
    assert rules_pass({"DbWriterBatchingWindowSeconds": "0", "DbWriterBatchSize": "10"}) == []
    assert rules_pass({"DbWriterTimeoutSeconds": "60", "TurnQueueVisibilityTimeout": "180"}) == ["VisibilityCoversTheWriter"]
    assert rules_pass({"DbWriterTimeoutSeconds": "60", "TurnQueueVisibilityTimeout": "360"}) == []
    assert rules_pass({"AuthMode": "jwt"}) == ["JwtNeedsAnIssuer"]
    assert rules_pass({"AuthMode": "jwt", "JwtIssuer": "https://i.example"}) == ["JwtNeedsAnIssuer"]
    assert rules_pass({"AuthMode": "api_key,jwt", "CognitoUserPoolId": "us-east-1_X"}) == ["JwtNeedsAnIssuer"]


@pytest.mark.parametrize("name,expected", [
    ("samconfig-default", {"AUTH_MODE": "api_key", "JWT_ISSUER": "", "COGNITO_USER_POOL_ID": ""}),
    ("cognito", {"AUTH_MODE": "api_key,jwt", "COGNITO_USER_POOL_ID": "us-east-1_AbC123",
                 "COGNITO_CLIENT_ID": "app-client-1", "JWT_ISSUER": ""}),
    ("oidc-issuer", {"AUTH_MODE": "jwt", "JWT_ISSUER": "https://login.example.com/", "JWT_AUDIENCE": "chat-api"}),
])
def test_sign_in_settings_reach_chat_stream(name, expected):
    t, p = RENDERS[name], values(RENDERS[name], SETS[name])
    env = resolved(name)["ChatStreamFunction"]["Properties"]["Environment"]["Variables"]
    got = {k: ev(env.get(k), t, p) for k in expected}
    assert got == expected


def test_abuse_and_spend_limits_reach_chat_stream_with_the_documented_defaults():
    name = "samconfig-default"
    t, p = RENDERS[name], values(RENDERS[name], SETS[name])
    env = resolved(name)["ChatStreamFunction"]["Properties"]["Environment"]["Variables"]
    got = {k: str(ev(env.get(k), t, p)) for k in (
        "MAX_STREAMS_PER_USER", "READ_RATE_LIMIT_RPM",
        "AUTH_FAILURES_PER_IP_PER_MINUTE", "DAILY_TOKEN_BUDGET_PER_USER")}
    assert got == {"MAX_STREAMS_PER_USER": "4", "READ_RATE_LIMIT_RPM": "120",
                   "AUTH_FAILURES_PER_IP_PER_MINUTE": "20", "DAILY_TOKEN_BUDGET_PER_USER": "0"}
    # Without Redis the counters live in the table: chat-stream may update it.
    role = resolved(name)["ChatStreamFunctionRole"]
    assert ("dynamodb:UpdateItem", "ChatTable.Arn") in grants(role)


def test_the_sam_local_env_file_sets_only_declared_variables():
    """`sam local invoke --env-vars` overrides only variables the template
    declares; anything else in the file would be silently ignored."""
    env = json.loads((ROOT / "events/sam-local-env.json").read_text())
    declared = resolved("samconfig-default")["ChatStreamFunction"]["Properties"]["Environment"]["Variables"]
    for function, variables in env.items():
        assert function == "ChatStreamFunction"
        missing = set(variables) - set(declared)
        assert not missing, f"not declared in template.yaml: {missing}"
    # Declared empty: ignored in AWS, where the secret ARNs are used.
    assert declared["ANTHROPIC_API_KEY"] == "" and declared["API_KEY_HASHES"] == ""


def test_no_resource_name_grows_with_the_stack_name():
    """Names with a length limit must not be built from the stack's name
    (CloudFormation Rules cannot measure it): only log groups are, and
    their limit (512) leaves room for any stack name (128)."""
    for name in SETS:
        for k, r in resolved(name).items():
            for prop in ("ServerlessCacheName", "FunctionName", "QueueName", "TableName", "RoleName"):
                v = r["Properties"].get(prop)
                if v is None or (prop == "FunctionName" and r["Type"] != "AWS::Lambda::Function"):
                    continue
                assert "AWS::StackName" not in json.dumps(v), f"{k}.{prop} grows with the stack name"


# --- tracing, metrics, alarms, dashboard, queries (issue 16) ----------------

FUNCTIONS = {"ChatStreamFunction": "chat-stream", "DbWriterFunction": "db-writer", "CacheWarmerFunction": "cache-warmer"}


def emitted_metrics():
    """Every metric name the Rust code writes in an EMF line
    (`.ms("Name", ..)` / `.count("Name", ..)` / the match of cache outcomes)."""
    import re
    names = set()
    for f in (ROOT / "crates/chat-core/src").rglob("*.rs"):
        text = f.read_text()
        names |= set(re.findall(r'\.(?:ms|count)\(\s*"([A-Za-z]+)"', text))
        names |= set(re.findall(r'=> "(Cache[A-Za-z]+)"', text))
    return names


def test_the_code_emits_the_metrics_the_alarms_and_dashboard_read():
    names = emitted_metrics()
    # A sanity check of the scan itself: the metrics of issue 16.
    for m in ("TimeToFirstToken", "Total", "UpstreamTime", "Overhead", "CacheHit", "CacheMiss",
              "CacheFollow", "InputTokens", "OutputTokens", "RateLimited", "UpstreamErrors",
              "QueueSendTime", "BatchSize", "WriteFailures", "Refreshes"):
        assert m in names, m


@pytest.mark.parametrize("name", list(SETS))
def test_every_function_is_traced_and_alarms_notify_the_topic_when_given(name):
    res = resolved(name)
    for logical in FUNCTIONS:
        if logical in res:
            props = res[logical]["Properties"]
            assert props["TracingConfig"] == {"Mode": "Active"}, (name, logical)
            env = props["Environment"]["Variables"]
            assert env["METRICS_NAMESPACE"] == {"Ref": "AWS::StackName"}, (name, logical)
    chat_env = res["ChatStreamFunction"]["Properties"]["Environment"]["Variables"]
    assert chat_env["LOG_USER_KEY_SECRET_ARN"] == {"Ref": "LogUserKeySecret"}
    secret = res["LogUserKeySecret"]["Properties"]["GenerateSecretString"]
    assert secret["PasswordLength"] >= 32
    alarms = {k: r for k, r in res.items() if r["Type"] == "AWS::CloudWatch::Alarm"}
    assert set(alarms) == {"TimeToFirstTokenAlarm", "ErrorRateAlarm", "ThrottlesAlarm",
                           "TurnDeadLetterAlarm", "TurnQueueAgeAlarm", "DbWriterFailuresAlarm"}
    topic = SETS[name].get("AlarmTopicArn")
    for k, a in alarms.items():
        actions = a["Properties"].get("AlarmActions")
        if topic:
            assert actions == [{"Ref": "AlarmTopicArn"}], (name, k)
        else:
            assert actions is None, (name, k)


def metric_refs(alarm):
    p = alarm["Properties"]
    if "MetricName" in p:
        yield p["Namespace"], p["MetricName"], p.get("Dimensions", [])
    for m in p.get("Metrics", []):
        if "MetricStat" in m:
            mm = m["MetricStat"]["Metric"]
            yield mm["Namespace"], mm["MetricName"], mm.get("Dimensions", [])


def test_alarms_read_metrics_that_exist():
    res = resolved("samconfig-default")
    names = emitted_metrics()
    ttft = res["TimeToFirstTokenAlarm"]["Properties"]
    assert ttft["ExtendedStatistic"] == "p99"
    assert ttft["Threshold"] == {"Ref": "TtftP99AlarmMs"}
    ours = 0
    for k, a in res.items():
        if a["Type"] != "AWS::CloudWatch::Alarm":
            continue
        for ns, metric, dims in metric_refs(a):
            if ns == {"Ref": "AWS::StackName"}:
                ours += 1
                assert metric in names, (k, metric)
                assert [d["Name"] for d in dims] == ["function"], (k, dims)
                assert dims[0]["Value"] in FUNCTIONS.values(), (k, dims)
            else:
                assert ns in ("AWS/Lambda", "AWS/SQS"), (k, ns)
    assert ours >= 4
    rate = [m for m in res["ErrorRateAlarm"]["Properties"]["Metrics"] if m.get("ReturnData")]
    assert len(rate) == 1 and "requests" in rate[0]["Expression"]


def test_the_dashboard_is_valid_json_of_metrics_that_exist():
    res = resolved("samconfig-default")
    body, subs = res["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    assert subs == {"Ns": {"Ref": "AWS::StackName"}}
    import re
    filled = re.sub(r"\$\{([A-Za-z0-9:.]+)\}", lambda m: {"TtftP99AlarmMs": "3000"}.get(m.group(1), "X" + m.group(1).replace(":", "").replace(".", "")), body)
    dash = json.loads(filled)
    names = emitted_metrics()
    seen = set()
    for w in dash["widgets"]:
        props = w["properties"]
        if w["type"] == "log":
            assert props["query"].startswith("SOURCE 'XChatStreamLogGroup'")
            continue
        prev = None
        for row in props["metrics"]:
            row = [c for c in row if not isinstance(c, dict)]
            if row == ["..."]:
                row = prev
            if row[0] == "XNs":
                assert row[1] in names, row
                assert row[2] == "function" and row[3] in FUNCTIONS.values(), row
                seen.add(row[1])
            else:
                assert row[0] in ("AWS/Lambda", "AWS/SQS"), row
            prev = row
    assert {"TimeToFirstToken", "Overhead", "UpstreamTime", "CacheHit", "OutputTokens",
            "WriteFailures"} <= seen


def test_saved_queries_read_fields_the_code_writes():
    res = resolved("samconfig-default")
    queries = {k: r["Properties"] for k, r in res.items() if r["Type"] == "AWS::Logs::QueryDefinition"}
    assert set(queries) == {"SlowestRequestsQuery", "CacheHitRateQuery", "TokensPerUserPerDayQuery"}
    relay = (ROOT / "crates/chat-core/src/chat/relay.rs").read_text()
    for q in queries.values():
        assert q["LogGroupNames"] == [{"Ref": "ChatStreamLogGroup"}]
    slow = queries["SlowestRequestsQuery"]["QueryString"]
    for field in ("validate_ms", "limits_ms", "history_ms", "upstream_connect_ms", "upstream_ms",
                  "overhead_ms", "ttft_ms", "total_ms"):
        assert field in slow and f"{field} =" in relay, field
    tokens = queries["TokensPerUserPerDayQuery"]["QueryString"]
    assert "by user" in tokens and "InputTokens" in tokens
