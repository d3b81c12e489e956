//! Who may come in, before any route does its work: an address refused for
//! failing to sign in too often gets 429 before any credential is looked
//! up; a failed sign-in is counted against its address; and on the read
//! routes (GET and DELETE) the user's requests per minute are limited.
//! The chat routes' own limits (rate, tokens, streams, budget) are checked
//! with the rest of their pre-work, in parallel (see `chat::plan`).

use axum::http::HeaderMap;

use tracing::Instrument;

use crate::auth::Identity;
use crate::error::ApiError;
use crate::state::{AppState, RequestCtx};

/// Which limits apply after sign-in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Access {
    /// `POST /chat` and the OpenAI route: limited in the chat's pre-work.
    Chat,
    /// The GET and DELETE routes: `READ_RATE_LIMIT_RPM`.
    Read,
    /// `/health` details: sign-in only.
    Health,
}

pub(super) async fn admit(
    state: &AppState,
    ctx: &RequestCtx,
    headers: &HeaderMap,
    access: Access,
) -> Result<Identity, ApiError> {
    let address = &ctx.caller;
    if let Some(b) = state.sign_ins().blocked(address) {
        return Err(blocked(b));
    }
    let authenticated = state
        .authenticate(headers)
        .instrument(tracing::info_span!("auth"))
        .await;
    let identity = match authenticated {
        Ok(i) => {
            ctx.span
                .record("user", crate::obs::pseudonym::of(&i.user_id).as_str());
            i
        }
        Err(e) => {
            if e.code == "invalid_credentials" {
                if let Some(b) = state.sign_ins().failed(address).await {
                    tracing::warn!(request_id = %ctx.id, "too many failed sign-ins from one address");
                    return Err(blocked(b));
                }
            }
            return Err(e);
        }
    };
    if access == Access::Read {
        let caller = format!("read:user:{}", identity.user_id);
        let (d, _) = state.read_limiter().check(&caller, 0).await;
        if !d.allowed {
            let mut e = ApiError::limited(
                "rate_limited",
                "READ_RATE_LIMIT_RPM",
                "too many requests per minute on the read routes; retry after the reset",
                d.reset,
                d.scope,
            );
            e.headers = d.headers();
            return Err(e);
        }
    }
    Ok(identity)
}

fn blocked(b: crate::limits::Blocked) -> ApiError {
    ApiError::limited(
        "auth_rate_limited",
        "AUTH_FAILURES_PER_IP_PER_MINUTE",
        "too many failed sign-ins from this address; retry after the reset",
        b.retry_after,
        b.scope,
    )
}
