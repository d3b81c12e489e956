//! Packing turns into transactions.

use super::*;
use crate::persistence::turn::TURN_SCHEMA_VERSION;
use crate::persistence::turn::TurnStatus;

fn rec(turn: &str, conv: &str, user: &str) -> TurnRecord {
    TurnRecord {
        v: TURN_SCHEMA_VERSION,
        turn_id: turn.into(),
        conversation_id: conv.into(),
        user_id: user.into(),
        started_at_ms: 1_700_000_000_000,
        completed_at_ms: 1_700_000_000_500,
        status: TurnStatus::Completed,
        status_raw: None,
        model: "m".into(),
        user_message: "q".into(),
        answer: Some("a".into()),
        answer_parts: None,
        answer_bytes: 1,
        stop_reason: None,
        input_tokens: 2,
        output_tokens: 3,
        error_code: None,
    }
}

#[test]
fn pack_shares_counter_updates_and_respects_the_action_limit() {
    // 300 turns in 10 conversations of 2 users: every transaction stays
    // within 100 actions, and counters are one update per
    // conversation / user-day per transaction, not one per turn.
    let recs: Vec<_> = (0..300)
        .map(|i| {
            rec(
                &format!("t{i}"),
                &format!("c{}", i % 10),
                &format!("u{}", i % 2),
            )
        })
        .collect();
    let pending: Vec<usize> = (0..recs.len()).collect();
    let txns = pack(&recs, &pending);
    assert!(txns.iter().all(|t| t.actions() <= TXN_MAX_ACTIONS));
    assert_eq!(txns.iter().map(|t| t.turns.len()).sum::<usize>(), 300);
    assert_eq!(txns.len(), 4, "88 turns + 10 + 2 updates per transaction");
    let usage: u64 = txns
        .iter()
        .flat_map(|t| t.usage.iter().map(|(_, v)| v.0))
        .sum();
    assert_eq!(usage, 300);
}

#[test]
fn pack_splits_by_size() {
    let mut recs: Vec<_> = (0..20).map(|i| rec(&format!("t{i}"), "c", "u")).collect();
    for r in &mut recs {
        r.answer = Some("x".repeat(250_000));
    }
    let txns = pack(&recs, &(0..20).collect::<Vec<_>>());
    assert!(txns.len() >= 2);
    assert!(txns.iter().all(|t| t.bytes <= TXN_MAX_BYTES));
}
