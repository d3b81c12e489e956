//! A caller's rate limit and stream slot in one round trip. Both keep
//! their Redis keys under the caller's `{hash tag}` (`rl:{user:ID}:...`,
//! `streams:{user:ID}`), so one script may touch both, in cluster mode
//! too: the rate check first, then (only if it allowed the request) the
//! slot. Each answer means what it means alone ([`RateLimiter::check`],
//! [`StreamSlots::take`]); without Redis, with either limit off, or when
//! the script gets no answer, each is asked on its own, at once.

use std::sync::{Arc, LazyLock};

use redis::Script;

use super::rate::RATE_LUA;
use super::streams::TAKE_LUA;
use super::{Decision, RateLimiter, Reservation, Slot, StreamSlots, StreamsFull};

/// KEYS 1-4 and ARGV 1-5: the rate check's; KEYS 5 and ARGV 6-10: the
/// slot's. Returns the rate check's three numbers, then the take's two
/// (`0, 0` when the rate check refused: no slot was taken).
static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    let take = TAKE_LUA
        .replace("KEYS[1]", "KEYS[5]")
        .replace("ARGV[1]", "ARGV[6]")
        .replace("ARGV[2]", "ARGV[7]")
        .replace("ARGV[3]", "ARGV[8]")
        .replace("ARGV[4]", "ARGV[9]")
        .replace("ARGV[5]", "ARGV[10]");
    Script::new(&format!(
        "local function rate()\n{RATE_LUA}\nend\nlocal function take()\n{take}\nend\n\
         local r = rate()\n\
         if r[1] ~= 1 then return {{r[1], r[2], r[3], 0, 0}} end\n\
         local t = take()\n\
         return {{r[1], r[2], r[3], t[1], t[2]}}\n"
    ))
});

/// Settles a reservation (KEYS[1], by ARGV[1] tokens in a window of
/// ARGV[2] ms) and gives a slot back (KEYS[2], member ARGV[3]).
const RELEASE: &str = r"
if tonumber(ARGV[1]) ~= 0 then
  redis.call('INCRBY', KEYS[1], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
end
redis.call('ZREM', KEYS[2], ARGV[3])
return 1
";

static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE));

/// The end of an answer: its reservation settled to `used` tokens and its
/// stream slot given back, in one script when both are in the same Redis
/// (the caller's slot), else each as it is kept.
pub async fn release(tokens: Option<Reservation>, slot: Option<Slot>, used: u32) {
    match (tokens, slot) {
        (Some(mut t), Some(mut s))
            if t.fleet_link()
                .zip(s.fleet_link())
                .is_some_and(|(a, b)| Arc::ptr_eq(a, b)) =>
        {
            let (Some((link, tkey, delta)), Some((_, skey, member))) =
                (t.take_fleet(used), s.take_fleet())
            else {
                return;
            };
            let (window, delta) = (super::rate::WINDOW_MS.to_string(), delta.to_string());
            let sent = link
                .script::<i64>(
                    &RELEASE_SCRIPT,
                    &[&tkey, &skey],
                    &[&delta, &window, &member],
                    link.timeout(),
                )
                .await;
            if sent.is_none() {
                // The counts run out with their window, the slot with its lease.
                tracing::debug!("reservation and slot not released in redis");
            }
        }
        // Boxed like `admit`'s: every answer awaits `release` while it
        // streams, so this large and rarer path would size every one.
        (t, s) => {
            Box::pin(async move {
                let settle = async {
                    if let Some(t) = t {
                        t.settle(used).await;
                    }
                };
                let give = async {
                    if let Some(s) = s {
                        s.give_back().await;
                    }
                };
                tokio::join!(settle, give);
            })
            .await;
        }
    }
}

/// Checks `caller`'s rate limit (reserving `reserve` tokens) and takes a
/// stream slot as `slot_id`.
pub async fn admit(
    limiter: &Arc<RateLimiter>,
    slots: &Arc<StreamSlots>,
    caller: &str,
    reserve: u32,
    slot_id: &str,
) -> (
    (Decision, Option<Reservation>),
    Result<Option<Slot>, StreamsFull>,
) {
    if let (Some((link, check)), Some((same, take))) = (
        limiter.redis_check(caller, reserve),
        slots.redis_take(caller, slot_id),
    ) {
        if Arc::ptr_eq(link, same) {
            let keys: Vec<&str> = check
                .keys
                .iter()
                .map(String::as_str)
                .chain([take.key.as_str()])
                .collect();
            let nums = check.args.map(|a| a.to_string());
            let args: Vec<&str> = nums
                .iter()
                .chain(take.args.iter())
                .map(String::as_str)
                .collect();
            let answer = link
                .script::<(i64, i64, i64, i64, i64)>(&ADMIT, &keys, &args, link.timeout())
                .await;
            if let Some((allowed, remaining, why, ok, open)) = answer {
                let rate = limiter.checked(caller, &check, (allowed, remaining, why));
                let slot = if allowed == 1 {
                    slots.taken(caller, slot_id, &take, (ok, open)).map(Some)
                } else {
                    Ok(None)
                };
                return (rate, slot);
            }
        }
    }
    // Boxed: the two checks on their own are a large future, and inline
    // they would size (and be copied with) every request's pre-work.
    Box::pin(async { tokio::join!(limiter.check(caller, reserve), slots.take(caller, slot_id)) })
        .await
}
