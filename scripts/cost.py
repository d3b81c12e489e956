#!/usr/bin/env python3
"""What 1M chats use, in the units AWS bills: Lambda GB-seconds and
requests (arm64 at 512 / 1024 / 2048 MB), provisioned concurrency
GB-seconds, DynamoDB write and read request units, SQS requests, and the
ElastiCache Serverless minimum. Prices are not built in (they change and
differ by Region): pass them to get dollars.

Use: cost.py [--answer-seconds S] [--overhead-ms MS] [--answer-kb KB]
             [--turns-per-conversation N] [--batch N] [--provisioned N]
             [--cache dynamodb|redis|none] [--hit-rate R]
             [--prices lambda_gbs=..,lambda_req_per_m=..,pc_gbs=..,wru_per_m=..,rru_per_m=..,sqs_per_m=..,cache_gb_hour=..]

Every default is an assumption, printed with the result; the overhead
default is this project's measured added time per answer (BENCHMARKS.md)."""

import argparse
import math

MONTH_S = 30 * 24 * 3600


def units(a, mem_mb):
    chats = 1_000_000
    misses = chats * (1 - a.hit_rate if a.cache != "none" else 1)
    hits = chats - misses
    # Billed duration: a miss lasts as long as the model streams, plus our
    # overhead; a hit a few ms (measured: well under 5 ms).
    billed_s = misses * (a.answer_seconds + a.overhead_ms / 1000) + hits * 0.005
    gbs = billed_s * mem_mb / 1024
    # DynamoDB, per turn (see README "Persistence"): the turn's conditional
    # Put in a transaction (transactional writes cost 2 WRU per KB), the
    # conversation and user-day counter updates shared by the turns of a
    # batch (2 WRU each in the transaction), and the two conditional
    # UpdateItems that move the summary (1 WRU each) per conversation per
    # batch. Reads: the history Query of a continued conversation (0.5 RRU
    # per 4 KB, eventually consistent) when Redis is not there to hold it.
    item_kb = math.ceil(a.answer_kb + 0.5)
    groups_per_turn = 1 / min(a.batch, a.turns_per_conversation)
    wru = chats * (2 * item_kb + 2 * 2 * groups_per_turn + 2 * groups_per_turn)
    continued = chats * (1 - 1 / a.turns_per_conversation)
    history_kb = min(a.turns_per_conversation, 20) * (a.answer_kb + 0.5)
    rru = continued * 0.5 * math.ceil(history_kb / 4) if a.cache != "redis" else 0
    if a.cache == "dynamodb":
        rru += chats * 0.5 * math.ceil(a.answer_kb / 4)  # the lookup
        wru += misses * item_kb  # the entry
    # SQS: one send per turn; receives and deletes by the batch.
    sqs = chats * (1 + 2 / a.batch)
    return {
        "lambda GB-s": gbs,
        "lambda requests": chats,
        "DynamoDB WRU": wru,
        "DynamoDB RRU": rru,
        "SQS requests": sqs,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--answer-seconds", type=float, default=5.0)
    p.add_argument("--overhead-ms", type=float, default=0.5)
    p.add_argument("--answer-kb", type=float, default=2.0)
    p.add_argument("--turns-per-conversation", type=int, default=4)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--provisioned", type=int, default=0)
    p.add_argument("--cache", choices=["dynamodb", "redis", "none"], default="dynamodb")
    p.add_argument("--hit-rate", type=float, default=0.0)
    p.add_argument("--prices", default="", help="lambda_gbs, lambda_req_per_m, pc_gbs, wru_per_m, rru_per_m, sqs_per_m")
    a = p.parse_args()
    prices = dict(kv.split("=") for kv in a.prices.split(",") if kv)
    prices = {k: float(v) for k, v in prices.items()}
    print(f"Per 1,000,000 chats. Assumptions: answer {a.answer_seconds} s of model streaming, "
          f"our overhead {a.overhead_ms} ms, answer {a.answer_kb} KB, {a.turns_per_conversation} turns per "
          f"conversation, db-writer batches of {a.batch}, cache {a.cache} with hit rate {a.hit_rate}, "
          f"{a.provisioned} provisioned environments.\n")
    print("| memory (arm64) | Lambda GB-s | requests | provisioned GB-s / month | DynamoDB WRU | DynamoDB RRU | SQS requests |"
          + (" dollars |" if prices else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if prices else ""))
    for mem in (512, 1024, 2048):
        u = units(a, mem)
        pc = a.provisioned * mem / 1024 * MONTH_S
        row = (f"| {mem} MB | {u['lambda GB-s']:,.0f} | {u['lambda requests']:,} | {pc:,.0f} | "
               f"{u['DynamoDB WRU']:,.0f} | {u['DynamoDB RRU']:,.0f} | {u['SQS requests']:,.0f} |")
        if prices:
            d = (u["lambda GB-s"] * prices.get("lambda_gbs", 0)
                 + u["lambda requests"] / 1e6 * prices.get("lambda_req_per_m", 0)
                 + pc * prices.get("pc_gbs", 0)
                 + u["DynamoDB WRU"] / 1e6 * prices.get("wru_per_m", 0)
                 + u["DynamoDB RRU"] / 1e6 * prices.get("rru_per_m", 0)
                 + u["SQS requests"] / 1e6 * prices.get("sqs_per_m", 0))
            row += f" {d:,.2f} |"
        print(row)
    if a.cache == "redis":
        print("\nElastiCache Serverless bills stored data per GB-hour, with a minimum amount of data "
              "billed whatever the use (see its pricing page for the engine's minimum), plus ECPUs per "
              "request: a fixed monthly floor that the other rows do not have.")


if __name__ == "__main__":
    main()
