#!/usr/bin/env python3
"""Creates the DynamoDB table and SQS queues of template.yaml in the local
AWS stand-in (moto server at AWS_ENDPOINT_URL), from the template's own
resource definitions: there is no second copy of the schema to keep in step.

    local_aws.py ensure [--prefix local] [--param Name=Value ...] [--format env|json]

Resources are named PREFIX-LogicalId. `--param` overrides template
parameter defaults the way `sam deploy --parameter-overrides` does (tests
use it for short visibility timeouts). Prints the environment that points
chat-stream and db-writer at them. Creating what already exists is a no-op.
"""

import argparse
import json
import os
import sys
import time

import boto3
import yaml

# Which template resources the local stack needs, and the variable that
# names each one for the binaries.
OUTPUTS = {
    "ChatTable": "TABLE_NAME",
    "TurnQueue": "TURN_QUEUE_URL",
    "TurnDeadLetterQueue": "TURN_DLQ_URL",
}


class Tag:
    def __init__(self, tag, value):
        self.tag, self.value = tag, value


def load_template(path):
    class Loader(yaml.SafeLoader):
        pass

    def construct(loader, suffix, node):
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        return Tag(suffix, value)

    Loader.add_multi_constructor("!", construct)
    with open(path) as f:
        return yaml.load(f, Loader=Loader)


class Resolver:
    def __init__(self, template, params):
        self.params = {
            name: str(spec.get("Default", ""))
            for name, spec in template.get("Parameters", {}).items()
        }
        for p in params:
            name, _, value = p.partition("=")
            if name not in self.params:
                sys.exit(f"--param {name}: the template has no such parameter")
            self.params[name] = value
        self.attrs = {}

    def __call__(self, v):
        if isinstance(v, Tag):
            if v.tag == "Ref":
                if v.value in self.params:
                    return self.params[v.value]
                return self.attrs[(v.value, "Ref")]
            if v.tag == "GetAtt":
                logical, attr = (
                    v.value.split(".", 1) if isinstance(v.value, str) else v.value
                )
                return self.attrs[(logical, attr)]
            sys.exit(f"!{v.tag} is not supported in the local stack's resources")
        if isinstance(v, dict):
            return {k: self(x) for k, x in v.items()}
        if isinstance(v, list):
            return [self(x) for x in v]
        return v


def client(service):
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        sys.exit("AWS_ENDPOINT_URL is not set (scripts/services.sh start sets it)")
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
    )


def ensure_table(ddb, name, props):
    args = {
        k: props[k]
        for k in (
            "AttributeDefinitions",
            "KeySchema",
            "GlobalSecondaryIndexes",
            "BillingMode",
            "SSESpecification",
        )
        if k in props
    }
    if "SSESpecification" in args:
        args["SSESpecification"] = {"Enabled": args["SSESpecification"]["SSEEnabled"]}
    try:
        ddb.create_table(TableName=name, **args)
    except ddb.exceptions.ResourceInUseException:
        return
    for _ in range(100):
        if ddb.describe_table(TableName=name)["Table"]["TableStatus"] == "ACTIVE":
            break
        time.sleep(0.05)
    ttl = props.get("TimeToLiveSpecification")
    if ttl:
        ddb.update_time_to_live(
            TableName=name,
            TimeToLiveSpecification={
                "AttributeName": ttl["AttributeName"],
                "Enabled": bool(ttl["Enabled"]),
            },
        )
    pitr = props.get("PointInTimeRecoverySpecification")
    if pitr:
        ddb.update_continuous_backups(
            TableName=name,
            PointInTimeRecoverySpecification={
                "PointInTimeRecoveryEnabled": bool(pitr["PointInTimeRecoveryEnabled"])
            },
        )


QUEUE_ATTRS = (
    "VisibilityTimeout",
    "MessageRetentionPeriod",
    "DelaySeconds",
    "ReceiveMessageWaitTimeSeconds",
    "SqsManagedSseEnabled",
)


def ensure_queue(sqs, name, props):
    attrs = {k: str(props[k]).lower() if isinstance(props[k], bool) else str(props[k])
             for k in QUEUE_ATTRS if k in props}
    if "RedrivePolicy" in props:
        rp = props["RedrivePolicy"]
        attrs["RedrivePolicy"] = json.dumps(
            {
                "deadLetterTargetArn": rp["deadLetterTargetArn"],
                "maxReceiveCount": str(rp["maxReceiveCount"]),
            }
        )
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    if attrs:
        sqs.set_queue_attributes(QueueUrl=url, Attributes=attrs)
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    return url, arn


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["ensure"])
    ap.add_argument("--prefix", default="local")
    ap.add_argument("--param", action="append", default=[])
    ap.add_argument("--format", choices=["env", "json"], default="env")
    ap.add_argument("--template", default=os.path.join(here, "..", "template.yaml"))
    args = ap.parse_args()

    template = load_template(args.template)
    resources = template["Resources"]
    resolve = Resolver(template, args.param)
    ddb, sqs = client("dynamodb"), client("sqs")
    out = {}
    # Queues without a redrive policy first: the others point at them.
    order = sorted(
        (n for n in OUTPUTS if n in resources),
        key=lambda n: "RedrivePolicy" in resources[n].get("Properties", {}),
    )
    for logical in order:
        res = resources[logical]
        name = f"{args.prefix}-{logical}"
        props = resolve(res.get("Properties", {}))
        if res["Type"] == "AWS::DynamoDB::Table":
            ensure_table(ddb, name, props)
            resolve.attrs[(logical, "Ref")] = name
            out[OUTPUTS[logical]] = name
        elif res["Type"] == "AWS::SQS::Queue":
            url, arn = ensure_queue(sqs, name, props)
            resolve.attrs[(logical, "Ref")] = url
            resolve.attrs[(logical, "Arn")] = arn
            resolve.attrs[(logical, "QueueName")] = name
            out[OUTPUTS[logical]] = url
        else:
            sys.exit(f"{logical}: {res['Type']} is not supported locally")
    if args.format == "json":
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"export {k}={v}")


if __name__ == "__main__":
    main()
