#!/usr/bin/env python3
"""A simulated A/B test on MovieLens-100k (part of `make bench`; alone:
`TT_SKIP_LOAD=1 python3 bench/movielens_ab.py` after `make demo`).

Two variants of the home feed, both 50 items, with the demo's models:
  control: two-tower recall alone (the demo's index, k 200 → 50);
  merged:  the demo's merged funnel (two-tower, item-CF, Swing, RRF 300 → 50).
Offline: both lists for every test user (the leave-last-out test item, every training item
excluded), HR@50 of each and their difference.
Online: a split `ab_home` (50/50 by user id, TT_SALTS salts, default 20); each test user asks
once through the split with a request id (the impression log), and clicks the held-out movie
when it is in the list (twotower.feedback). twotower.online_metrics gives each variant's HR@50
with its interval and the difference with its interval. The online experiment sees each user
in one variant only, so its estimate has the sampling error of a half-sized sample; the
question is whether it finds the offline winner and an interval that holds the offline effect.
Prints markdown tables.
"""

import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from movielens import psql  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SALTS = int(os.environ.get("TT_SALTS", "20"))

SETUP = """
SET client_min_messages = warning;
SELECT count(*) FROM (SELECT twotower.drop_pipeline(name) FROM twotower.pipelines
                       WHERE name = 'ab_home') d;
SELECT count(*) FROM (SELECT twotower.drop_pipeline(name) FROM twotower.pipelines
                       WHERE name IN ('ab_twotower', 'ab_merged')) d;
SELECT twotower.save_pipeline('ab_twotower', jsonb_build_object(
         'user_model', definition -> 'user_model', 'vectors', definition -> 'vectors', 'history', definition -> 'history',
         'channels', jsonb_build_array(definition -> 'channels' -> 0), 'k', 50))
  FROM twotower.pipelines WHERE name = 'ml_feed';
SELECT twotower.save_pipeline('ab_merged', (definition - 'k' - 'merge') || jsonb_build_object(
         'merge', (definition -> 'merge') || '{"k": 300}', 'k', 50))
  FROM twotower.pipelines WHERE name = 'ml_feed';
DROP TABLE IF EXISTS ab_q;
CREATE TABLE ab_q AS
SELECT t.user_id, t.item_id::bigint AS target, twotower.user_features('ml_user', t.user_id::text) AS features,
       ARRAY(SELECT s.item_id::bigint FROM ml_train s WHERE s.user_id = t.user_id) AS seen
  FROM ml_test t;
ANALYZE ab_q;
"""


def offline():
    out = psql("""
SELECT p, count(*), avg((q.target = ANY (ARRAY(SELECT r.item_id FROM twotower.recommend(p, q.features, exclude => q.seen) r)))::int)
  FROM ab_q q, unnest(ARRAY['ab_twotower', 'ab_merged']) p GROUP BY p;
""")
    res = {}
    for line in out.strip().splitlines():
        p, n, hr = line.split("|")
        res[p] = (int(n), float(hr))
    return res


def online(salt):
    out = psql(f"""
SET client_min_messages = warning;
SELECT twotower.save_pipeline('ab_home', '{{"unit": "user_id", "salt": "{salt}", "variants": [
  {{"name": "control", "pipeline": "ab_twotower", "share": 50}},
  {{"name": "merged", "pipeline": "ab_merged", "share": 50}}]}}');
DELETE FROM twotower.feedback_log WHERE request_id LIKE 'ab-%';
DELETE FROM twotower.impression_log WHERE request_id LIKE 'ab-%';
SELECT count(*) FROM ab_q q,
       twotower.recommend('ab_home', q.features, exclude => q.seen, request_id => 'ab-{salt}-' || q.user_id) r;
SELECT count(twotower.feedback(i.request_id, q.target))
  FROM twotower.impression_log i JOIN ab_q q ON i.request_id = 'ab-{salt}-' || q.user_id
 WHERE q.target = ANY (i.items);
SELECT variant, requests, hit_rate, hit_rate_low, hit_rate_high,
       coalesce(hit_rate_diff::text, ''), coalesce(hit_rate_diff_low::text, ''), coalesce(hit_rate_diff_high::text, '')
  FROM twotower.online_metrics('ab_home');
""")
    rows = [line.split("|") for line in out.strip().splitlines() if line.count("|") == 7]
    return {r[0]: r[1:] for r in rows}


def main():
    if os.environ.get("TT_SKIP_LOAD") != "1":
        subprocess.run([os.path.join(ROOT, "scripts", "movielens.sh")], check=True)
    psql(SETUP)
    off = offline()
    n, hr_c = off["ab_twotower"]
    _, hr_m = off["ab_merged"]
    diff = hr_m - hr_c
    print(f"## A simulated A/B test: two-tower recall alone against the merged funnel ({n} test users)\n")
    print("| offline (every user, both lists) | HR@50 |")
    print("|---|---|")
    print(f"| control: two-tower (ab_twotower) | {hr_c:.4f} |")
    print(f"| merged funnel (ab_merged) | {hr_m:.4f} |")
    print(f"| difference | **{diff:+.4f}** |\n")
    print("| salt | control users | control HR@50 [95 %] | merged users | merged HR@50 [95 %] | difference [95 %] | same winner | offline difference inside |")
    print("|---|---|---|---|---|---|---|---|")
    diffs, same, inside = [], 0, 0
    for s in range(1, SALTS + 1):
        salt = f"ab-{s}"
        m = online(salt)
        c, g = m["control"], m["merged"]
        d, lo, hi = float(g[4]), float(g[5]), float(g[6])
        diffs.append(d)
        w = (d > 0) == (diff > 0)
        ins = lo <= diff <= hi
        same += w
        inside += ins
        print(f"| {salt} | {c[0]} | {float(c[1]):.4f} [{float(c[2]):.3f}, {float(c[3]):.3f}] | {g[0]} | "
              f"{float(g[1]):.4f} [{float(g[2]):.3f}, {float(g[3]):.3f}] | {d:+.4f} [{lo:+.3f}, {hi:+.3f}] | "
              f"{'yes' if w else 'no'} | {'yes' if ins else 'no'} |")
    print(f"\n# online difference over {SALTS} salts: mean {statistics.mean(diffs):+.4f}, "
          f"spread (sd) {statistics.pstdev(diffs):.4f}; offline {diff:+.4f}. Same winner in {same} of {SALTS}; "
          f"the offline effect inside the online 95 % interval in {inside} of {SALTS}.")


if __name__ == "__main__":
    main()
