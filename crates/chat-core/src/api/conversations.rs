//! `GET /conversations`, `GET /conversations/{id}` and
//! `DELETE /conversations/{id}`: the caller's own conversations only.
//! Someone else's conversation and a conversation that does not exist get
//! the same 404.
//!
//! Reads are Queries (the GSI for the list, the conversation's partition
//! for its turns) run in parallel with the recent-turns buffer, so a turn
//! db-writer has not written yet is still shown.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::admit::{Access, admit};
use super::error_response;
use crate::error::ApiError;
use crate::persistence::history::BufferedTurn;
use crate::persistence::store::{ConversationMeta, Store, StoreError, StoredTurn};
use crate::state::{AppState, RequestCtx};
use crate::util::rfc3339;

const LIST_DEFAULT: u32 = 20;
const TURNS_DEFAULT: u32 = 50;
const PAGE_MAX: u32 = 100;

fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "conversation_not_found",
        "no such conversation",
    )
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::BadCursor => ApiError::bad_request(
            "invalid_cursor",
            "cursor is not one this API returned for this listing",
        )
        .with_field("cursor"),
        other => {
            tracing::warn!(error = %other, "conversation read failed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                "conversation storage is unavailable; retry shortly",
            )
        }
    }
}

fn store(state: &AppState) -> Result<&Store, ApiError> {
    state.deps().store.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "persistence_disabled",
            "conversations are not stored by this deployment (TABLE_NAME is not set)",
        )
    })
}

/// `limit` (1-100) and `cursor` from the query string.
fn page_params(
    q: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    default: u32,
) -> Result<(u32, Option<String>), ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    if let Some(k) = q.keys().find(|k| !matches!(k.as_str(), "limit" | "cursor")) {
        return Err(ApiError::bad_request(
            "unknown_parameter",
            format!("unknown query parameter {k:?}; known: limit, cursor"),
        )
        .with_field(k.as_str()));
    }
    let limit = match q.get("limit") {
        None => default,
        Some(v) => match v.parse::<u32>() {
            Ok(n) if (1..=PAGE_MAX).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_field",
                    format!("limit must be a whole number from 1 to {PAGE_MAX}"),
                )
                .with_field("limit"));
            }
        },
    };
    let cursor = q.get("cursor").filter(|c| !c.is_empty()).cloned();
    if cursor.as_ref().is_some_and(|c| c.len() > 2048) {
        return Err(
            ApiError::bad_request("invalid_cursor", "cursor is too long").with_field("cursor"),
        );
    }
    Ok((limit, cursor))
}

fn summary(m: &ConversationMeta) -> Value {
    json!({
        "id": m.id,
        "title": m.title,
        "created_at": rfc3339(m.created_at_ms),
        "updated_at": rfc3339(m.updated_at_ms),
        "message_count": m.message_count,
    })
}

pub(crate) async fn list(
    State(state): State<AppState>,
    q: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    ctx: RequestCtx,
    headers: HeaderMap,
) -> Response {
    let run = async {
        let who = admit(&state, &ctx, &headers, Access::Read).await?;
        let (limit, cursor) = page_params(q, LIST_DEFAULT)?;
        let store = store(&state)?;
        let (convs, next) = store
            .list_conversations(&who.user_id, limit, cursor.as_deref())
            .await
            .map_err(store_error)?;
        let list: Vec<Value> = convs.iter().map(summary).collect();
        Ok::<_, ApiError>(Json(json!({ "conversations": list, "next_cursor": next })))
    };
    match run.await {
        Ok(body) => no_store(body.into_response()),
        Err(e) => error_response(e),
    }
}

fn messages_of(
    turn_id: &str,
    started: u64,
    completed: u64,
    user: &str,
    answer: &str,
    extra: Value,
) -> [Value; 2] {
    let mut assistant = json!({
        "role": "assistant",
        "turn_id": turn_id,
        "content": answer,
        "created_at": rfc3339(completed),
    });
    if let (Some(a), Value::Object(e)) = (assistant.as_object_mut(), extra) {
        a.extend(e);
    }
    [
        json!({"role": "user", "turn_id": turn_id, "content": user, "created_at": rfc3339(started)}),
        assistant,
    ]
}

fn stored_messages(t: &StoredTurn) -> [Value; 2] {
    messages_of(
        &t.turn_id,
        t.started_at_ms,
        t.completed_at_ms,
        &t.user_message,
        &t.answer,
        json!({
            "status": t.status.as_str(),
            "model": t.model,
            "stop_reason": t.stop_reason,
            "error_code": t.error_code,
            "usage": {"input_tokens": t.input_tokens, "output_tokens": t.output_tokens},
        }),
    )
}

fn buffered_messages(t: &BufferedTurn) -> [Value; 2] {
    messages_of(
        &t.turn_id,
        t.started_at_ms,
        t.started_at_ms,
        &t.user_message,
        &t.answer,
        json!({"status": "completed", "pending_write": true}),
    )
}

pub(crate) async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    ctx: RequestCtx,
    headers: HeaderMap,
) -> Response {
    let run = async {
        let who = admit(&state, &ctx, &headers, Access::Read).await?;
        let (limit, cursor) = page_params(q, TURNS_DEFAULT)?;
        let store = store(&state)?;
        if !crate::chat::request::valid_conversation_id(&id) {
            return Err(not_found());
        }
        let buffered = async {
            match &state.deps().buffer {
                Some(b) => b.load(&id).await.unwrap_or_default(),
                None => Vec::new(),
            }
        };
        let (meta, page, buffered) = tokio::join!(
            store.get_conversation(&id),
            store.turns_page(&id, limit, cursor.as_deref()),
            buffered
        );
        let meta = meta.map_err(store_error)?;
        let owner = meta
            .as_ref()
            .map(|m| m.owner.as_str())
            .or_else(|| buffered.first().map(|t| t.user_id.as_str()));
        if owner != Some(&*who.user_id) {
            return Err(not_found());
        }
        let (turns, next) = page.map_err(store_error)?;
        let mut messages: Vec<Value> = turns.iter().flat_map(stored_messages).collect();
        if next.is_none() {
            // Last page: add what the buffer has that the table does not yet.
            let newest = turns.last().map_or(0, |t| t.started_at_ms);
            for b in &buffered {
                let known = turns.iter().any(|t| t.turn_id == b.turn_id);
                if !known && b.started_at_ms >= newest && b.user_id == *who.user_id {
                    messages.extend(buffered_messages(b));
                }
            }
        }
        let mut body = match &meta {
            Some(m) => summary(m),
            None => json!({
                "id": id,
                "title": buffered.first().map(|t| t.user_message.chars().take(80).collect::<String>()),
                "created_at": buffered.first().map(|t| rfc3339(t.started_at_ms)),
                "updated_at": buffered.last().map(|t| rfc3339(t.started_at_ms)),
                "message_count": buffered.len() * 2,
            }),
        };
        body["messages"] = Value::Array(messages);
        body["next_cursor"] = json!(next);
        Ok::<_, ApiError>(Json(body))
    };
    match run.await {
        Ok(body) => no_store(body.into_response()),
        Err(e) => error_response(e),
    }
}

fn no_store(mut r: Response) -> Response {
    r.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("private, no-store"),
    );
    r
}

/// `DELETE /conversations/{id}`: the owner erases a conversation, its
/// turns, the parts of long answers and its recent-turns buffer. Cached
/// answers are keyed by content, not by conversation: they are not found
/// from here and expire with the cache TTL (README "Security").
pub(crate) async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ctx: RequestCtx,
    headers: HeaderMap,
) -> Response {
    let run = async {
        let who = admit(&state, &ctx, &headers, Access::Read).await?;
        let store = store(&state)?;
        if !crate::chat::request::valid_conversation_id(&id) {
            return Err(not_found());
        }
        let meta = store.get_conversation(&id).await.map_err(store_error)?;
        if meta.as_ref().map(|m| m.owner.as_str()) != Some(&*who.user_id) {
            return Err(not_found());
        }
        let items = store.delete_conversation(&id).await.map_err(store_error)?;
        if let Some(b) = &state.deps().buffer {
            if !b.forget(&id).await {
                tracing::warn!("recent-turns buffer not cleared; it expires with its TTL");
            }
        }
        tracing::info!(items, "conversation deleted");
        Ok::<_, ApiError>(Json(json!({ "id": id, "deleted": true })))
    };
    match run.await {
        Ok(body) => no_store(body.into_response()),
        Err(e) => error_response(e),
    }
}
