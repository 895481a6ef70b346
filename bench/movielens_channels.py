#!/usr/bin/env python3
"""Item-to-item channels on MovieLens-100k (part of `make bench`; alone:
`python3 bench/movielens_channels.py`, after scripts/movielens.sh has loaded the data).

Tuned on validation only: each channel is built from ml_train without each user's last rating
(ml_fit) and scored on that last rating (ml_valid), over a small grid of channel options and
history lengths / recency decays. The best configuration per kind (scripts/movielens-channels.json
holds the ones the demo uses) is then built from all of ml_train and evaluated once on the test
items (each user's last rating), with the user's training items masked, as the two-tower model
and popularity are. Prints markdown tables.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from movielens import psql  # noqa: E402

DAY = 86400
GRID = {
    "itemcf": [{}, {"alpha": 0.7}, {"alpha": 0.3}, {"half_life": 30 * DAY}, {"iuf": False}],
    "swing": [{}, {"alpha": 5}, {"beta": 0.5}, {"alpha": 0.5, "beta": 0.1}],
}
HISTORIES = [(10, 0.9), (20, 0.8), (20, 0.95), (50, 0.95)]


def metrics(ranks):
    """HR and NDCG at 10 and 50 of `ranks`, a WITH query defining r(user_id, rank) (NULL: not
    in the list)."""
    out = psql(ranks + """
SELECT k || ':' || avg((coalesce(rank, 1000000) <= k)::int) || ':' || avg(CASE WHEN rank <= k THEN 1 / log(2, rank + 1) ELSE 0 END)
  FROM r, (VALUES (10), (50)) ks(k) GROUP BY k ORDER BY k;""")
    res = {}
    for line in out.strip().splitlines():
        k, hr, nd = line.split(":")
        res[("hr", int(k))] = float(hr)
        res[("ndcg", int(k))] = float(nd)
    return res


def build(name, kind, table, opts):
    psql(f"""SELECT count(*) FROM twotower.channels WHERE name = '{name}' AND twotower.drop_channel(name, true);
SELECT rows FROM twotower.build_channel('{name}', '{kind}', '{table}', '{name}_nb', '{json.dumps(dict(opts, top_n=200))}');""")


def evaluate(channel, train, target, hist_len, decay):
    """HR and NDCG at 10 and 50 of `channel` on `target` (one item per user), histories and
    masks from `train` (most recent first, weights decay^i)."""
    ranks = f"""
WITH h AS (
  SELECT user_id, (array_agg(item_id::bigint ORDER BY ts DESC, ctid DESC))[1:{hist_len}] AS items,
         array_agg(item_id::bigint) AS seen
    FROM {train} GROUP BY user_id),
r AS (
  SELECT t.user_id,
         (SELECT min(x.rank) FROM twotower.i2i_recall('{channel}', h.items,
                 ARRAY(SELECT power({decay}, g - 1)::real FROM generate_series(1, cardinality(h.items)) g), 50, h.seen) x
           WHERE x.item_id = t.item_id) AS rank
    FROM {target} t JOIN h USING (user_id))
"""
    return metrics(ranks)


def hist_sql(train, hist_len):
    return f"""SELECT user_id, (array_agg(item_id::bigint ORDER BY ts DESC, ctid DESC))[1:{hist_len}] AS items,
         array_agg(item_id::bigint) AS seen FROM {train} GROUP BY user_id"""


def weights_sql(decay):
    return f"ARRAY(SELECT power({decay}, g - 1)::real FROM generate_series(1, cardinality(h.items)) g)"


def evaluate_funnel(chosen, channels, train, target, queries, strategy, opts, per_channel=200):
    """HR/NDCG@10/50 of the merged list: two-tower recall (model ml_user over the demo's index,
    inputs from `queries`) and the item-to-item channels `channels` (kind -> channel name), each
    `per_channel` deep, merged by `strategy` into 50; the user's `train` items masked."""
    parts = [f"""SELECT 'twotower' AS c, item_id AS i, score AS s FROM twotower.recall('ml_user', 'ml_item_vectors_idx',
                  q.features, {per_channel}, exclude => h0.seen)"""]
    joins = []
    for n, (kind, ch) in enumerate(channels.items()):
        c = chosen[kind]
        joins.append(f"JOIN ({hist_sql(train, c['history'])}) h{n + 1} USING (user_id)")
        w = weights_sql(c["decay"]).replace("h.items", f"h{n + 1}.items")
        parts.append(f"SELECT '{kind}', item_id, score FROM twotower.i2i_recall('{ch}', h{n + 1}.items, {w}, {per_channel}, h0.seen)")
    union = "\n UNION ALL ".join(parts)
    ranks = f"""
WITH r AS (
  SELECT t.user_id,
         (SELECT m.rank FROM (SELECT array_agg(c) AS c, array_agg(i) AS i, array_agg(s) AS s FROM ({union}) u) x,
                 twotower.merge(x.c, x.i, x.s, 50, '{strategy}', '{json.dumps(opts)}') m WHERE m.item_id = t.item_id) AS rank
    FROM {target} t JOIN {queries} q USING (user_id) JOIN ({hist_sql(train, 1)}) h0 USING (user_id) {" ".join(joins)})
"""
    return metrics(ranks)


MERGES = [
    ("rrf", {}),
    ("rrf", {"weights": {"twotower": 2}}),
    ("rrf", {"weights": {"twotower": 1, "itemcf": 2}}),
    ("quota", {"quotas": {"twotower": 25, "itemcf": 15, "swing": 10}}),
    ("quota", {"quotas": {"twotower": 20, "itemcf": 20, "swing": 10}}),
    ("weighted_sum", {"norm": "rank"}),
    ("weighted_sum", {"norm": "minmax"}),
]


def main():
    psql("""DROP TABLE IF EXISTS ml_fit, ml_valid;
CREATE TEMP TABLE o AS SELECT user_id, item_id, ts, ctid AS c,
       row_number() OVER (PARTITION BY user_id ORDER BY ts DESC, ctid DESC) AS from_end FROM ml_train;
CREATE TABLE ml_fit AS SELECT user_id, item_id, ts FROM o WHERE from_end > 1 ORDER BY c;
CREATE TABLE ml_valid AS SELECT user_id, item_id, ts FROM o WHERE from_end = 1 ORDER BY c;""")
    print("# Item-to-item channels on MovieLens-100k: tuned on validation (each user's second-last rating)")
    print()
    print("| kind | options | history (length, decay) | valid HR@50 | valid NDCG@50 |")
    print("|---|---|---|---|---|")
    best = {}
    for kind, grid in GRID.items():
        for gi, opts in enumerate(grid):
            name = f"v_{kind}{gi}"
            build(name, kind, "ml_fit", opts)
            for hl, dec in HISTORIES:
                r = evaluate(name, "ml_fit", "ml_valid", hl, dec)
                print(f"| {kind} | `{json.dumps(opts)}` | {hl}, {dec} | {r[('hr', 50)]:.4f} | {r[('ndcg', 50)]:.4f} |", flush=True)
                if kind not in best or r[("hr", 50)] > best[kind][0]:
                    best[kind] = (r[("hr", 50)], opts, hl, dec)
            psql(f"SELECT twotower.drop_channel('{name}', true);")
    print()
    print("Test (each user's last rating, touched once), the kept configuration of each kind:")
    print()
    print("| channel | options | history | HR@10 | NDCG@10 | HR@50 | NDCG@50 |")
    print("|---|---|---|---|---|---|---|")
    chosen = {}
    for kind, (_, opts, hl, dec) in best.items():
        name = f"t_{kind}"
        build(name, kind, "ml_train", opts)
        r = evaluate(name, "ml_train", "ml_test", hl, dec)
        print(f"| {kind} | `{json.dumps(opts)}` | {hl}, {dec} | {r[('hr', 10)]:.4f} | {r[('ndcg', 10)]:.4f} | "
              f"{r[('hr', 50)]:.4f} | {r[('ndcg', 50)]:.4f} |", flush=True)
        chosen[kind] = {"options": opts, "history": hl, "decay": dec}
    # The merged funnel: the strategy chosen on validation (channels built from ml_fit, the
    # two-tower inputs from ml_fit: everything before each user's validation rating).
    print()
    print("Merged (two-tower + item-CF + Swing, 200 each, merged into 50), tuned on validation:")
    print()
    print("| strategy | options | valid HR@50 | valid NDCG@50 |")
    print("|---|---|---|---|")
    for kind in chosen:
        build(f"v_{kind}", kind, "ml_fit", chosen[kind]["options"])
    psql("""DROP TABLE IF EXISTS ml_valid_queries;
CREATE TABLE ml_valid_queries AS SELECT v.user_id, twotower.user_features('ml_user', v.user_id::text, interactions => 'ml_fit') AS features
  FROM ml_valid v;
DROP TABLE IF EXISTS ml_test_queries;
CREATE TABLE ml_test_queries AS SELECT t.user_id, twotower.user_features('ml_user', t.user_id::text) AS features FROM ml_test t;""")
    best_merge = None
    for strategy, opts in MERGES:
        r = evaluate_funnel(chosen, {k: f"v_{k}" for k in chosen}, "ml_fit", "ml_valid", "ml_valid_queries", strategy, opts)
        print(f"| {strategy} | `{json.dumps(opts)}` | {r[('hr', 50)]:.4f} | {r[('ndcg', 50)]:.4f} |", flush=True)
        if best_merge is None or r[("hr", 50)] > best_merge[0]:
            best_merge = (r[("hr", 50)], strategy, opts)
    for kind in chosen:
        psql(f"SELECT twotower.drop_channel('v_{kind}', true);")
    _, strategy, opts = best_merge
    r = evaluate_funnel(chosen, {k: f"t_{k}" for k in chosen}, "ml_train", "ml_test", "ml_test_queries", strategy, opts)
    print()
    print(f"Test, merged by {strategy} `{json.dumps(opts)}`: HR@10 {r[('hr', 10)]:.4f}, NDCG@10 {r[('ndcg', 10)]:.4f}, "
          f"HR@50 {r[('hr', 50)]:.4f}, NDCG@50 {r[('ndcg', 50)]:.4f}")
    chosen["merge"] = {"strategy": strategy, "options": opts}
    print()
    print(f"Chosen (scripts/movielens-channels.json): `{json.dumps(chosen)}`")


if __name__ == "__main__":
    main()
