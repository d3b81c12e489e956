use super::*;
use serde_json::json;

fn limits() -> Limits {
    Limits {
        max_body_bytes: 10_000,
        max_message_chars: 50,
        max_system_chars: 20,
        max_tokens: 100,
        default_max_tokens: 50,
    }
}

fn ok(body: Value) -> Completion {
    parse(body.to_string().as_bytes(), &limits(), None, None).unwrap()
}

fn err(body: Value) -> ApiError {
    parse(body.to_string().as_bytes(), &limits(), None, None).unwrap_err()
}

#[test]
fn a_stateless_request_is_its_own_context() {
    let c = ok(json!({
        "model": "m", "stream": true, "stream_options": {"include_usage": true},
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "and kind"}]},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "again"},
            {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "text", "text": "more"}]},
        ],
        "max_completion_tokens": 30, "max_tokens": 99, "temperature": 0,
        "stop": "END", "user": "u-17", "n": 1, "logprobs": false,
    }));
    assert!(c.stream && c.include_usage);
    let t = c.turn;
    assert_eq!(t.system.as_deref(), Some("be brief\n\nand kind"));
    assert_eq!(t.message, "again\n\nand more");
    assert_eq!(t.max_tokens, Some(30));
    assert_eq!(t.temperature, Some(0.0));
    assert_eq!(t.stop, vec!["END"]);
    assert_eq!(t.model.as_deref(), Some("m"));
    assert!(!t.persist);
    assert_eq!(t.conversation_id, None);
    let ctx = t.context.unwrap();
    assert_eq!(ctx.len(), 2);
    assert_eq!(ctx[0].role, Role::User);
    assert_eq!(ctx[1].content, "hello");
}

#[test]
fn x_persist_and_x_conversation_id() {
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let c = parse(body.as_bytes(), &limits(), None, Some("true")).unwrap();
    assert!(c.turn.persist);
    assert!(c.turn.context.is_some());
    let c = parse(body.as_bytes(), &limits(), Some("conv-1"), None).unwrap();
    assert!(c.turn.persist);
    assert_eq!(c.turn.conversation_id.as_deref(), Some("conv-1"));
    assert_eq!(c.turn.context, None);
    let e = parse(body.as_bytes(), &limits(), None, Some("yes")).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("x-persist"));
    let e = parse(body.as_bytes(), &limits(), Some("../x"), None).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("x-conversation-id"));
    // With a stored history, exactly one new user message.
    let two = json!({"model": "m", "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}]})
    .to_string();
    let e = parse(two.as_bytes(), &limits(), Some("conv-1"), None).unwrap_err();
    assert_eq!(
        (e.status.as_u16(), e.field.as_deref()),
        (400, Some("messages"))
    );
}

#[test]
fn each_unsupported_or_bad_parameter_is_named() {
    let user = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<(Value, u16, &str)> = vec![
        (
            json!({"model": "m", "messages": user, "tools": []}),
            400,
            "tools",
        ),
        (
            json!({"model": "m", "messages": user, "functions": []}),
            400,
            "functions",
        ),
        (json!({"model": "m", "messages": user, "n": 2}), 400, "n"),
        (
            json!({"model": "m", "messages": user, "response_format": {"type": "json_object"}}),
            400,
            "response_format",
        ),
        (
            json!({"model": "m", "messages": user, "logprobs": true}),
            400,
            "logprobs",
        ),
        (
            json!({"model": "m", "messages": user, "top_p": 0.5}),
            400,
            "top_p",
        ),
        (
            json!({"model": "m", "messages": user, "seed": 1}),
            400,
            "seed",
        ),
        (json!({"messages": user}), 400, "model"),
        (json!({"model": "m"}), 400, "messages"),
        (json!({"model": "m", "messages": []}), 400, "messages"),
        (
            json!({"model": "m", "messages": user, "stream_options": {"include_usage": true}}),
            400,
            "stream_options",
        ),
        (
            json!({"model": "m", "messages": user, "stream": true, "stream_options": {"x": 1}}),
            400,
            "stream_options.x",
        ),
        (
            json!({"model": "m", "messages": user, "max_tokens": 101}),
            400,
            "max_tokens",
        ),
        (
            json!({"model": "m", "messages": user, "max_completion_tokens": 0}),
            400,
            "max_completion_tokens",
        ),
        (
            json!({"model": "m", "messages": user, "temperature": 1.5}),
            400,
            "temperature",
        ),
        (
            json!({"model": "m", "messages": user, "stop": ["a", "b", "c", "d", "e"]}),
            400,
            "stop",
        ),
        (
            json!({"model": "m", "messages": user, "stop": [""]}),
            400,
            "stop",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            400,
            "messages[0].content[0]",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
            400,
            "messages[0].content[0]",
        ),
        (
            json!({"model": "m", "messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}),
            400,
            "messages[0].tool_call_id",
        ),
        (
            json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}),
            400,
            "messages[0].role",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}),
            400,
            "messages",
        ),
        (
            json!({"model": "m", "messages": [{"role": "assistant", "content": "y"}, {"role": "user", "content": "x"}]}),
            400,
            "messages[0].role",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": null}]}),
            400,
            "messages[0].content",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(51)}]}),
            413,
            "messages[0].content",
        ),
        (
            json!({"model": "m", "messages": [{"role": "system", "content": "x".repeat(12)}, {"role": "system", "content": "x".repeat(12)}, {"role": "user", "content": "x"}]}),
            413,
            "messages",
        ),
    ];
    for (body, status, param) in cases {
        let e = err(body.clone());
        assert_eq!(e.status.as_u16(), status, "{body}");
        assert_eq!(e.field.as_deref(), Some(param), "{body}");
        assert!(!e.message.is_empty());
    }
    let e = parse(b"{", &limits(), None, None).unwrap_err();
    assert_eq!(e.code, "invalid_json");
    let e = parse(&vec![b' '; 10_001], &limits(), None, None).unwrap_err();
    assert_eq!(e.status.as_u16(), 413);
}
