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
HISTORIES = [(10, 0.9), (30, 0.9), (30, 1.0), (100, 0.97)]


def build(name, kind, table, opts):
    psql(f"""SELECT count(*) FROM twotower.channels WHERE name = '{name}' AND twotower.drop_channel(name, true);
SELECT rows FROM twotower.build_channel('{name}', '{kind}', '{table}', '{name}_nb', '{json.dumps(dict(opts, top_n=200))}');""")


def evaluate(channel, train, target, hist_len, decay):
    """HR and NDCG at 10 and 50 of `channel` on `target` (one item per user), histories and
    masks from `train` (most recent first, weights decay^i)."""
    out = psql(f"""
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
SELECT k || ':' || avg((coalesce(rank, 1000000) <= k)::int) || ':' || avg(CASE WHEN rank <= k THEN 1 / log(2, rank + 1) ELSE 0 END)
  FROM r, (VALUES (10), (50)) ks(k) GROUP BY k ORDER BY k;""")
    res = {}
    for line in out.strip().splitlines():
        k, hr, nd = line.split(":")
        res[("hr", int(k))] = float(hr)
        res[("ndcg", int(k))] = float(nd)
    return res


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
    print()
    print(f"Chosen (scripts/movielens-channels.json): `{json.dumps(chosen)}`")


if __name__ == "__main__":
    main()
