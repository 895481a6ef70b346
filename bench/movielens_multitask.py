#!/usr/bin/env python3
"""Multi-task pre-ranking on MovieLens-100k (issue 29; part of `make bench`; alone:
`TT_SKIP_LOAD=1 python3 bench/movielens_multitask.py` after `make demo`).

The protocol:
- per user, ratings sorted by time (ties in file order); the first 60 % (A) are the past the
  recall models learn from, the next 20 % (W1) label the training log, the last 20 % (W2) label
  the test log. The test windows are those of the negative-feedback benchmark
  (bench/movielens_feedback.py: the last 20 % of each user's ratings).
- Recall: the demo's funnel (its pipeline `ml_recall`: two-tower 200, item-CF 200, Swing 200,
  RRF into 300, options from scripts/movielens-options.json and movielens-channels.json) with
  its models rebuilt on A, because the demo's own towers were trained on every rating but each
  user's last and have seen both windows: a two-tower model `mt_user` / `mt_item` trained on A
  (seed fixed), item-CF and Swing built on A for the training log (`mt_recall_past`) and on
  A + W1 for the test log (`mt_recall_now`; the towers stay those of A, the request's history
  is the user's whole past). No recall model has seen a rating of its log's window.
- The logs: one request per user at the start of the window: the user tower's features with
  the history of everything rated before (twotower.user_features over A, or A + W1), the
  user's smoothed mean rating and share of ratings <= 2 before the window (u_avg, u_low);
  its candidates are the funnel's merged 300 with everything rated before excluded, in their
  merged order (the recall_rank input). Held-out items are not injected: a candidate list
  with the window's items added would tell them apart by how they got in (rank, two-tower
  score), which serving never sees; a window item that recall misses counts as a miss below.
- Labels of a candidate from the window's ratings: rated (the user rated it in the window: 1,
  else 0), liked (rated >= 4: 1, else 0, unrated too), disliked (rated <= 2: 1, else 0). Item
  features (genres, year, and from the ratings before the window: smoothed mean rating, share
  of ratings <= 2, log(1 + count)), the two-tower score, u ⊙ v, the history similarities and
  the recall rank feed every pre-rank model.
- Models: single-task (one model per task, today's train_prerank with label_column; hidden
  [64, 32]) against one multi-task model (tasks rated, liked, disliked; experts of [64], task
  heads [32]; validate_task liked). Each task's score ranks the request's candidates: AUC (per
  request over requests with a positive and a negative, averaged) and HR@10 (a positive in the
  top 10, over requests with a positive among the candidates). The fused ranking Σ fuse·σ(task)
  (the multi-task model's served "fused" stage; for the single-task models the same sum over
  the three models' σ(logit)) is scored on the window: HR@50 = the share of the user's
  held-out liked items (rated >= 4 in the window, recalled or not) in its top 50, averaged
  over users with one; NEG@50 = the same for the disliked items (<= 2; lower is better).
  The merged order (no pre-rank model) is the reference.
Tuning on validation only: train_prerank's validation requests (the last 20 % of the training
log by request id, ids in the order of the windows' start) pick the epoch and are scored
here (a single-task model's epoch by its own task's recall@50; a multi-task model's by the
liked items' recall@50 under its fused score, fuse 1, 1, -1 while the architecture is
chosen). Fixed beforehand: the multi-task architecture kept is the one with the best mean
validation AUC over the three tasks among shared-bottom (1 expert), MMoE (4 shared) and
PLE/CGC (2 shared + 1 per task); the fuse weights (rated in {0, 0.5, 1}, liked 1, disliked in
{0, -0.5, -1, -2}), for the multi-task model and for the single-task sum separately, at two
operating points: A, the lowest validation NEG@50 among the settings whose validation HR@50 is
within 0.01 of the best setting's; B, the largest validation HR@50 − NEG@50 (B was added after
a first run showed that A keeps no negative weight on this data; it too is chosen on
validation only; where the two kept settings differ, the single-task sum is also scored at the
multi-task model's, so that the two meet at one operating point). The multi-task model is
trained with each kept setting (the fuse weights choose its epoch) and serves its fused score.
Then every model is trained with TT_SEEDS seeds (default 3; the pre-rank seeds, the recall
models stay) and the test log is touched once per seed. Checks: the served fused score equals Σ fuse·σ of the served task scores, and
recommend_explain's scores through the whole funnel equal prerank's over the logged list.
Prints markdown tables (mean ± sd over the seeds).
"""

import json
import math
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from movielens import psql  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

with open(os.path.join(ROOT, "scripts", "movielens-options.json")) as f:
    BASE = json.load(f)
with open(os.path.join(ROOT, "scripts", "movielens-channels.json")) as f:
    CHANNELS = json.load(f)

TASKS = ["rated", "liked", "disliked"]
KEEP = 300  # the merged list's length
VALIDATION = 0.2

FEATURES = [
    {"name": "gender", "type": "categorical", "dim": 4},
    {"name": "occupation", "type": "categorical", "dim": 8},
    {"name": "age", "type": "numeric"},
    {"name": "u_avg", "type": "numeric"},
    {"name": "u_low", "type": "numeric"},
    {"name": "genres", "source": "item", "type": "multi_categorical", "dim": 8},
    {"name": "year", "source": "item", "type": "numeric"},
    {"name": "avg_rating", "source": "item", "type": "numeric"},
    {"name": "low_share", "source": "item", "type": "numeric"},
    {"name": "pop", "source": "item", "type": "numeric"},
    {"name": "uv", "type": "cross", "of": "product"},
    {"name": "tt", "type": "cross", "of": "score"},
    {"name": "hmax", "type": "cross", "of": "history_max"},
    {"name": "hmean", "type": "cross", "of": "history_mean"},
    {"name": "rr", "type": "cross", "of": "recall_rank"},
]
SCHEDULE = {"epochs": 20, "patience": 4, "lr": 0.001, "batch_size": 512, "k": 50, "validation": VALIDATION}

ARCHS = [("shared-bottom", {"shared": 1}), ("MMoE, 4 experts", {"shared": 4}),
         ("PLE/CGC, 2 shared + 1 per task", {"shared": 2, "per_task": 1})]
TRAIN_FUSE = {"rated": 1.0, "liked": 1.0, "disliked": -1.0}  # while the architecture is chosen
FUSE_GRID = [{"rated": r, "liked": 1.0, "disliked": d} for r in (0.0, 0.5, 1.0) for d in (0.0, -0.5, -1.0, -2.0)]


def single_options(seed):
    return dict(SCHEDULE, model={"features": FEATURES, "hidden": [64, 32]}, seed=seed)


def multi_options(experts, fuse, seed):
    return dict(SCHEDULE, model={"features": FEATURES, "hidden": [64], "experts": experts, "task_hidden": [32]},
                tasks=[{"name": t, "column": t, "loss": "logistic", "fuse": fuse[t]} for t in TASKS],
                validate_task="liked", seed=seed)


def q(s):
    return s.replace("'", "''")


def pipeline_def(name, channel_tag, items):
    """The demo's ml_recall with this benchmark's towers, vectors, channels and item features."""
    return f"""
SELECT twotower.save_pipeline('{name}',
  jsonb_set(jsonb_set(jsonb_set(jsonb_set(jsonb_set(jsonb_set(definition,
    '{{user_model}}', '"mt_user"'), '{{vectors,table}}', '"mt_item_vectors"'),
    '{{channels,0,index}}', '"mt_item_vectors_idx"'), '{{channels,1,channel}}', '"mt_itemcf_{channel_tag}"'),
    '{{channels,2,channel}}', '"mt_swing_{channel_tag}"'), '{{item_features,table}}', '"{items}"'))
  FROM twotower.pipelines WHERE name = 'ml_recall';"""


def stats_sql(table, users, cond):
    """Item and user statistics from the ratings that satisfy `cond` (those before a window)."""
    return f"""
CREATE TABLE {table} AS
  WITH g AS (SELECT avg(rating) AS mu, avg((rating <= 2)::int) AS pl FROM mt_ranked WHERE {cond}),
       s AS (SELECT item_id, count(*) AS c, sum(rating) AS sr, sum((rating <= 2)::int) AS sl
               FROM mt_ranked WHERE {cond} GROUP BY item_id)
  SELECT i.item_id, i.genres, i.year,
         ((coalesce(s.sr, 0) + 10 * g.mu) / (coalesce(s.c, 0) + 10))::real AS avg_rating,
         ((coalesce(s.sl, 0) + 10 * g.pl) / (coalesce(s.c, 0) + 10))::real AS low_share,
         ln(1 + coalesce(s.c, 0))::real AS pop
    FROM ml_items i LEFT JOIN s USING (item_id), g;
ALTER TABLE {table} ADD PRIMARY KEY (item_id);
CREATE TABLE {users} AS
  WITH g AS (SELECT avg(rating) AS mu, avg((rating <= 2)::int) AS pl FROM mt_ranked WHERE {cond})
  SELECT r.user_id, ((sum(r.rating) + 5 * g.mu) / (count(*) + 5))::real AS u_avg,
         ((sum((r.rating <= 2)::int) + 5 * g.pl) / (count(*) + 5))::real AS u_low
    FROM mt_ranked r, g WHERE {cond} GROUP BY r.user_id, g.mu, g.pl;
"""


def log_sql(tag, window, source, users, pipeline):
    """One request per user at the start of `window`: features over `source`, the candidates of
    `pipeline` with everything rated before excluded, labels from the window's ratings."""
    return f"""
CREATE TABLE mt_req_{tag} AS
  SELECT row_number() OVER (ORDER BY w.start_ts, w.user_id)::int AS request_id, w.user_id,
         twotower.user_features('mt_user', w.user_id::text, NULL, '{source}') AS base,
         ARRAY(SELECT a.item_id::bigint FROM {source} a WHERE a.user_id = w.user_id) AS seen
    FROM (SELECT user_id, min(ts) AS start_ts FROM {window} GROUP BY user_id) w;
ALTER TABLE mt_req_{tag} ADD COLUMN features jsonb;
UPDATE mt_req_{tag} r SET features = r.base || jsonb_build_object('u_avg', u.u_avg, 'u_low', u.u_low)
  FROM {users} u WHERE u.user_id = r.user_id;
ALTER TABLE mt_req_{tag} ADD PRIMARY KEY (request_id);
CREATE TABLE mt_cand_{tag} AS
  SELECT r.request_id, c.item_id, c.rank,
         (w.item_id IS NOT NULL)::int::real AS rated,
         coalesce(w.rating >= 4, false)::int::real AS liked,
         coalesce(w.rating <= 2, false)::int::real AS disliked
    FROM mt_req_{tag} r
         CROSS JOIN LATERAL twotower.recommend('{pipeline}', r.base, exclude => r.seen) c
         LEFT JOIN {window} w ON w.user_id = r.user_id AND w.item_id = c.item_id;
CREATE INDEX ON mt_cand_{tag} (request_id);
ANALYZE mt_req_{tag}, mt_cand_{tag};
"""


SETUP = """
SET client_min_messages = warning;
SELECT count(*) FROM (SELECT twotower.drop_pipeline(name) FROM twotower.pipelines WHERE name LIKE 'mt\\_%') p;
SELECT count(*) FROM (SELECT twotower.drop_model(name) FROM twotower.models WHERE name LIKE 'mt\\_%' GROUP BY name) m;
SELECT count(*) FROM (SELECT twotower.drop_channel(name, true) FROM twotower.channels WHERE name LIKE 'mt\\_%') c;
DROP TABLE IF EXISTS mt_ranked, mt_a, mt_aw, mt_w1, mt_w2, mt_items_past, mt_items_now, mt_users_past, mt_users_now,
  mt_item_vectors, mt_req_train, mt_cand_train, mt_req_test, mt_cand_test CASCADE;
CREATE TABLE mt_ranked AS
  SELECT r.seq, r.user_id, r.item_id, r.rating, r.ts,
         row_number() OVER (PARTITION BY r.user_id ORDER BY r.ts, r.seq) AS pos,
         count(*) OVER (PARTITION BY r.user_id) AS n
    FROM ml_ratings r;
-- A: the first 60 % of each user's ratings; W1 the next 20 %; W2 the last 20 %. Tables in
-- file order (the tie rule).
CREATE TABLE mt_a AS SELECT user_id, item_id, ts FROM mt_ranked WHERE pos <= floor(0.6 * n) ORDER BY seq;
CREATE TABLE mt_aw AS SELECT user_id, item_id, ts FROM mt_ranked WHERE pos <= floor(0.8 * n) ORDER BY seq;
CREATE TABLE mt_w1 AS SELECT user_id, item_id, rating, ts FROM mt_ranked
  WHERE pos > floor(0.6 * n) AND pos <= floor(0.8 * n) ORDER BY seq;
CREATE TABLE mt_w2 AS SELECT user_id, item_id, rating, ts FROM mt_ranked WHERE pos > floor(0.8 * n) ORDER BY seq;
CREATE INDEX ON mt_a (user_id);
CREATE INDEX ON mt_aw (user_id);
""" + stats_sql("mt_items_past", "mt_users_past", "pos <= floor(0.6 * n)") \
    + stats_sql("mt_items_now", "mt_users_now", "pos <= floor(0.8 * n)") + """
ANALYZE mt_a, mt_aw, mt_w1, mt_w2, mt_items_past, mt_items_now, mt_users_past, mt_users_now;
SELECT 'counts|' || (SELECT count(*) FROM mt_a) || '|' || (SELECT count(*) FROM mt_w1) || '|' || (SELECT count(*) FROM mt_w2) || '|' ||
       (SELECT count(*) FROM mt_w1 WHERE rating >= 4) || '|' || (SELECT count(*) FROM mt_w1 WHERE rating <= 2) || '|' ||
       (SELECT count(*) FROM mt_w2 WHERE rating >= 4) || '|' || (SELECT count(*) FROM mt_w2 WHERE rating <= 2);
"""


def recall_setup():
    """The two-tower model on A, its vectors and index, the channels and the two recall
    pipelines, then the two logs."""
    cfg = json.loads(json.dumps(BASE))
    ch = CHANNELS
    out = psql(f"""
SET client_min_messages = warning;
SET maintenance_work_mem = '1GB';
SELECT 'tt|' || best_epoch || '|' || round(valid_recall::numeric, 4) FROM twotower.train('mt_user', 'mt_item', 'mt_a', '{q(json.dumps(cfg))}',
       user_features => 'ml_users', item_features => 'ml_items') WHERE kind = 'user';
CREATE TABLE mt_item_vectors (id bigint PRIMARY KEY, embedding real[]);
SELECT count(*) FROM twotower.refresh_item_vectors('mt_item', 'ml_items', 'mt_item_vectors', id_column => 'item_id');
CREATE INDEX mt_item_vectors_idx ON mt_item_vectors USING twotower_hnsw (embedding real_cosine_ops);
SELECT count(*) FROM (
  SELECT * FROM twotower.build_channel('mt_itemcf_past', 'itemcf', 'mt_a', 'mt_itemcf_past_nb', '{q(json.dumps(dict(ch["itemcf"]["options"], top_n=200)))}')
  UNION ALL SELECT * FROM twotower.build_channel('mt_swing_past', 'swing', 'mt_a', 'mt_swing_past_nb', '{q(json.dumps(dict(ch["swing"]["options"], top_n=200)))}')
  UNION ALL SELECT * FROM twotower.build_channel('mt_itemcf_now', 'itemcf', 'mt_aw', 'mt_itemcf_now_nb', '{q(json.dumps(dict(ch["itemcf"]["options"], top_n=200)))}')
  UNION ALL SELECT * FROM twotower.build_channel('mt_swing_now', 'swing', 'mt_aw', 'mt_swing_now_nb', '{q(json.dumps(dict(ch["swing"]["options"], top_n=200)))}')) b;
{pipeline_def('mt_recall_past', 'past', 'mt_items_past')}
{pipeline_def('mt_recall_now', 'now', 'mt_items_now')}
{log_sql('train', 'mt_w1', 'mt_a', 'mt_users_past', 'mt_recall_past')}
{log_sql('test', 'mt_w2', 'mt_aw', 'mt_users_now', 'mt_recall_now')}
SELECT 'log|' || x.tag || '|' || (SELECT count(*) FROM mt_req_train WHERE x.tag = 'train') + (SELECT count(*) FROM mt_req_test WHERE x.tag = 'test')
  || '|' || count(*) || '|' || sum(rated) || '|' || sum(liked) || '|' || sum(disliked)
  FROM (SELECT 'train' AS tag, * FROM mt_cand_train UNION ALL SELECT 'test', * FROM mt_cand_test) x GROUP BY x.tag;
""")
    lines = out.strip().splitlines()
    tt = [x for x in lines if x.startswith("tt|")][0].split("|")[1:]
    logs = {}
    for line in lines:
        p = line.split("|")
        if p[0] == "log":
            logs[p[1]] = [int(float(v)) for v in p[2:]]
    return tt, logs


def load_log(tag):
    """{request: {item: (rank, rated, liked, disliked)}}, {request: user}, {user: {item: rating}}
    of the window."""
    window = "mt_w1" if tag == "train" else "mt_w2"
    out = psql(f"""
SELECT 'c|' || request_id || '|' || item_id || '|' || rank || '|' || rated || '|' || liked || '|' || disliked FROM mt_cand_{tag};
SELECT 'r|' || request_id || '|' || user_id FROM mt_req_{tag};
SELECT 'w|' || user_id || '|' || item_id || '|' || rating FROM {window};
""")
    cands, users, held = {}, {}, {}
    for line in out.splitlines():
        p = line.split("|")
        if p[0] == "c":
            cands.setdefault(int(p[1]), {})[int(p[2])] = (int(p[3]), float(p[4]), float(p[5]), float(p[6]))
        elif p[0] == "r":
            users[int(p[1])] = int(p[2])
        elif p[0] == "w":
            held.setdefault(int(p[1]), {})[int(p[2])] = float(p[3])
    return cands, users, held


TRAINED = {}  # model name -> the options it was last trained with (in this run)


def train(name, opts, label=None):
    """Trains pre-rank model `name` on the training log (again only if the options changed)."""
    key = json.dumps(opts, sort_keys=True) + str(label)
    if TRAINED.get(name, (None,))[0] == key:
        return TRAINED[name][1]
    lab = f", label_column => '{label}'" if label else ""
    t0 = time.time()
    out = psql(f"""
SET client_min_messages = warning;
SET maintenance_work_mem = '1GB';
SELECT count(*) FROM (SELECT twotower.drop_pipeline(name) FROM twotower.pipelines WHERE name LIKE 'mt\\_s\\_%') p;
SELECT count(*) FROM (SELECT twotower.drop_model(name) FROM twotower.models WHERE name = '{name}' GROUP BY name) m;
SELECT 'pr|' || parameters || '|' || best_epoch || '|' || round(valid_recall::numeric, 4)
  FROM twotower.train_prerank('{name}', 'mt_recall_past', 'mt_req_train', 'mt_cand_train', '{q(json.dumps(opts))}',
                              rank_column => 'rank'{lab});
""")
    p = [x for x in out.splitlines() if x.startswith("pr|")][0].split("|")[1:]
    res = {"parameters": int(p[0]), "best_epoch": int(p[1]), "valid_recall": float(p[2]), "seconds": time.time() - t0}
    TRAINED[name] = (key, res)
    return res


def score(name, modes, tag, first=1):
    """Scores the logged candidates of requests >= first with model `name`, each mode a stage
    ranking by that task (None: a one-score model's score); {mode: {request: {item: score}}}."""
    base = "mt_recall_past" if tag == "train" else "mt_recall_now"
    sql = ["SET client_min_messages = warning;"]
    for i, m in enumerate(modes):
        stage = {"type": "model", "model": name, "keep": KEEP}
        if m is not None:
            stage["score"] = m
        sql.append(f"""
SELECT twotower.save_pipeline('mt_s_{i}', (definition - 'channels' - 'merge' - 'k')
         || '{q(json.dumps({"stages": [stage], "k": KEEP}))}'::jsonb)
  FROM twotower.pipelines WHERE name = '{base}';
SELECT 's|{i}|' || r.request_id || '|' || s.item_id || '|' || s.score
  FROM mt_req_{tag} r,
       LATERAL twotower.prerank('mt_s_{i}', r.features,
                                ARRAY(SELECT c.item_id FROM mt_cand_{tag} c WHERE c.request_id = r.request_id ORDER BY c.rank), {KEEP}) s
 WHERE r.request_id >= {first};""")
    out = psql("\n".join(sql))
    res = {m: {} for m in modes}
    for line in out.splitlines():
        p = line.split("|")
        if p[0] == "s" and len(p) == 5:
            res[modes[int(p[1])]].setdefault(int(p[2]), {})[int(p[3])] = float(p[4])
    return res


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def auc(pairs):
    """AUC of (score, label) pairs, ties counted half."""
    pairs = sorted(pairs)
    n_pos = sum(1 for _, y in pairs if y > 0.5)
    n_neg = len(pairs) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        avg = (i + j + 1) / 2.0  # 1-based average rank of the tie block
        rank_sum += avg * sum(1 for k in range(i, j) if pairs[k][1] > 0.5)
        i = j
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def top(scores, n):
    """The n best items of {item: score}, ties to the smaller id (as the stages)."""
    return [i for i, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def task_metrics(task_scores, cands, reqs):
    """{task: (AUC, HR@10, requests with a positive)} of {task: {request: {item: score}}}."""
    res = {}
    for ti, t in enumerate(TASKS):
        aucs, hits = [], []
        for r in reqs:
            s = task_scores[t][r]
            labels = {i: v[1 + ti] for i, v in cands[r].items()}
            a = auc([(s[i], labels[i]) for i in s])
            if a is not None:
                aucs.append(a)
            pos = {i for i, y in labels.items() if y > 0.5}
            if pos:
                hits.append(1.0 if pos & set(top(s, 10)) else 0.0)
        res[t] = (statistics.mean(aucs), statistics.mean(hits), len(hits))
    return res


def ranking_metrics(rank_scores, reqs, users, held, n=50):
    """HR@50 of the held-out liked items and NEG@50 of the disliked ones (per user, averaged
    over users with one) of {request: {item: score}}."""
    hr, neg = [], []
    for r in reqs:
        t = set(top(rank_scores[r], n))
        w = held.get(users[r], {})
        liked = [i for i, v in w.items() if v >= 4]
        disliked = [i for i, v in w.items() if v <= 2]
        if liked:
            hr.append(sum(i in t for i in liked) / len(liked))
        if disliked:
            neg.append(sum(i in t for i in disliked) / len(disliked))
    return statistics.mean(hr), statistics.mean(neg), len(hr), len(neg)


def fused(task_scores, fuse, reqs, link):
    return {r: {i: sum(fuse[t] * link(task_scores[t][r][i]) for t in TASKS) for i in task_scores[TASKS[0]][r]}
            for r in reqs}


def pick_fuse(task_scores, reqs, users, held, link):
    """The grid on validation and the two kept settings (the rules of the docstring): A, the
    lowest NEG@50 within 0.01 of the best HR@50; B, the largest HR@50 − NEG@50."""
    rows = [(f, ranking_metrics(fused(task_scores, f, reqs, link), reqs, users, held)) for f in FUSE_GRID]
    best = max(m[0] for _, m in rows)
    ok = [x for x in rows if x[1][0] >= best - 0.01]
    a = min(ok, key=lambda x: (x[1][1], -x[1][0]))[0]
    b = max(rows, key=lambda x: (x[1][0] - x[1][1], x[1][0]))[0]
    return rows, a, b


def fuse_tag(f):
    return f"rated {f['rated']:g}, liked {f['liked']:g}, disliked {f['disliked']:g}"


def explain_check(name, scores):
    """recommend_explain through the funnel with the multi-task stage: its scores of the kept
    items against prerank's over the logged candidates (the same list) and Σ fuse·σ."""
    # A database made by an older build has recommend_explain without `scores`: `make demo`
    # again (the check is skipped and says so).
    has = psql("SELECT count(*) FROM pg_proc p WHERE p.oid = 'twotower.recommend_explain(text, jsonb, integer, bigint[])'::regprocedure "
               "AND 'scores' = ANY (p.proargnames);").strip() == "1"
    if not has:
        return 0.0, 0, [], 0, has
    fn = "twotower.recommend_explain"
    out = psql(f"""
SET client_min_messages = warning;
SELECT twotower.save_pipeline('mt_s_explain', (definition - 'k') || '{q(json.dumps({"stages": [{"type": "model", "model": name, "keep": KEEP}], "k": KEEP}))}'::jsonb)
  FROM twotower.pipelines WHERE name = 'mt_recall_now';
SELECT 'e|' || r.request_id || '|' || e.kept_items::text || '|' || e.scores::text
  FROM (SELECT * FROM mt_req_test ORDER BY request_id LIMIT 5) r,
       LATERAL {fn}('mt_s_explain', r.features, exclude => r.seen) e
 WHERE e.scores IS NOT NULL;
SELECT twotower.drop_pipeline('mt_s_explain');
""")
    worst, n, keys, missing = 0.0, 0, set(), 0
    for line in out.splitlines():
        if not line.startswith("e|"):
            continue
        p = line.split("|", 3)[1:]
        r = int(p[0])
        items = [int(x) for x in p[1].strip("{}").split(",") if x]
        sc = json.loads(p[2])
        keys |= set(sc)
        for j, i in enumerate(items):
            for m in ["fused"] + TASKS:
                if m in sc:
                    if i not in scores[m][r] or len(sc[m]) != len(items):
                        missing += 1
                        continue
                    worst = max(worst, abs(sc[m][j] - scores[m][r][i]))
            n += 1
    return worst, n, sorted(keys), missing, has


def cell(xs):
    m = statistics.mean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:.4f} ± {sd:.4f}"


def main():
    t_start = time.time()
    if os.environ.get("TT_SKIP_LOAD") != "1":
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "movielens.sh")], check=True,
                       stdout=subprocess.DEVNULL)
    c = [x for x in psql(SETUP).splitlines() if x.startswith("counts|")][0].split("|")[1:]
    tt, logs = recall_setup()
    t_recall = time.time() - t_start
    print("# Multi-task pre-ranking on MovieLens-100k: 60 / 20 / 20 by time per user (issue 29)")
    print()
    print(f"Ratings: A {c[0]} (the recall models' past), W1 {c[1]} (training log; {c[3]} >= 4, {c[4]} <= 2), "
          f"W2 {c[2]} (test log; {c[5]} >= 4, {c[6]} <= 2). Two-tower model on A: best epoch {tt[0]}, "
          f"its validation HR@50 {tt[1]}.")
    print()
    print("| log | requests | candidates | rated | liked | disliked |")
    print("|---|---|---|---|---|---|")
    for tag in ("train", "test"):
        r = logs[tag]
        print(f"| {'training (W1)' if tag == 'train' else 'test (W2)'} | {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} |")
    print()
    print(f"(Recall, logs and the two-tower model: {t_recall:.0f} s.)")
    print()

    cands_tr, users_tr, held_tr = load_log("train")
    n = len(users_tr)
    first_valid = n - min(max(int(math.floor(n * VALIDATION + 0.5)), 1), n - 1) + 1
    vreqs = sorted(r for r in cands_tr if r >= first_valid)
    seed0 = 42
    merged_tr = {r: {i: -float(v[0]) for i, v in cands_tr[r].items()} for r in vreqs}

    # Validation: single-task models, then the multi-task architectures.
    print(f"Validation (seed {seed0}; train_prerank's validation requests {first_valid}..{n}, "
          f"{len(vreqs)} users; models on the other {first_valid - 1}):")
    print()
    print("| model | parameters | best epoch | AUC rated | AUC liked | AUC disliked | mean AUC | HR@10 rated | HR@10 liked | HR@10 disliked |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    mt = task_metrics({t: merged_tr for t in TASKS}, cands_tr, vreqs)
    print("| merged order (no model) | – | – | " + " | ".join(f"{mt[t][0]:.4f}" for t in TASKS)
          + f" | {statistics.mean(mt[t][0] for t in TASKS):.4f} | " + " | ".join(f"{mt[t][1]:.4f}" for t in TASKS) + " |")
    st_valid = {}
    for t in TASKS:
        info = train(f"mt_st_{t}", single_options(seed0), label=t)
        st_valid[t] = score(f"mt_st_{t}", [None], "train", first_valid)[None]
        m = task_metrics({x: st_valid[t] for x in TASKS}, cands_tr, vreqs)[t]
        print(f"| single-task {t} | {info['parameters']} | {info['best_epoch']} | "
              + " | ".join(f"{m[0]:.4f}" if x == t else "" for x in TASKS) + " | | "
              + " | ".join(f"{m[1]:.4f}" if x == t else "" for x in TASKS) + " |", flush=True)
    st_m = task_metrics(st_valid, cands_tr, vreqs)
    print("| single-task, the three models | – | – | " + " | ".join(f"{st_m[t][0]:.4f}" for t in TASKS)
          + f" | {statistics.mean(st_m[t][0] for t in TASKS):.4f} | " + " | ".join(f"{st_m[t][1]:.4f}" for t in TASKS) + " |")
    arch_rows = []
    for label, experts in ARCHS:
        info = train("mt_mt", multi_options(experts, TRAIN_FUSE, seed0))
        sc = score("mt_mt", TASKS, "train", first_valid)
        m = task_metrics(sc, cands_tr, vreqs)
        mean_auc = statistics.mean(m[t][0] for t in TASKS)
        arch_rows.append((label, experts, mean_auc, sc))
        print(f"| multi-task, {label} | {info['parameters']} | {info['best_epoch']} | "
              + " | ".join(f"{m[t][0]:.4f}" for t in TASKS) + f" | {mean_auc:.4f} | "
              + " | ".join(f"{m[t][1]:.4f}" for t in TASKS) + " |", flush=True)
    kept_label, kept_experts, _, mt_valid = max(arch_rows, key=lambda x: x[2])
    print()
    print(f"Kept architecture: {kept_label} (`experts` {json.dumps(kept_experts)}; the best mean validation AUC).")
    print()

    # Fuse weights on validation, for the kept multi-task model and the single-task sum.
    st_rows, st_a, st_b = pick_fuse(st_valid, vreqs, users_tr, held_tr, sigmoid)
    mt_rows, mt_a, mt_b = pick_fuse(mt_valid, vreqs, users_tr, held_tr, lambda x: x)
    mo = ranking_metrics(merged_tr, vreqs, users_tr, held_tr)
    print(f"Fuse weights on validation (HR@50 of the held-out liked items / NEG@50 of the disliked ones, "
          f"{mo[2]} / {mo[3]} users; the merged order: {mo[0]:.4f} / {mo[1]:.4f}):")
    print()
    print("| fuse (rated, liked, disliked) | single-task sum HR@50 | NEG@50 | multi-task fused HR@50 | NEG@50 |")
    print("|---|---|---|---|---|")
    for (f, a), (_, b) in zip(st_rows, mt_rows):
        tag = f"{f['rated']:g}, {f['liked']:g}, {f['disliked']:g}"
        kept = [f"{w} {r}" for w, fs in (("single", (st_a, st_b)), ("multi", (mt_a, mt_b)))
                for r, g in zip("AB", fs) if f == g]
        mark = f" (kept: {', '.join(kept)})" if kept else ""
        print(f"| {tag}{mark} | {a[0]:.4f} | {a[1]:.4f} | {b[0]:.4f} | {b[1]:.4f} |")
    print()
    print(f"Kept, A (the lowest validation NEG@50 among settings within 0.01 of the best HR@50): single-task sum "
          f"{fuse_tag(st_a)}; multi-task {fuse_tag(mt_a)}. B (the largest validation HR@50 − NEG@50): single-task sum "
          f"{fuse_tag(st_b)}; multi-task {fuse_tag(mt_b)}. The multi-task model is trained again with each kept "
          "setting (its fuse weights choose its epoch) and serves its fused score.")
    print()
    t_valid = time.time() - t_start

    # Test: each seed, the test log touched once.
    cands_te, users_te, held_te = load_log("test")
    treqs = sorted(cands_te)
    seeds = [seed0 + i for i in range(int(os.environ.get("TT_SEEDS", "3")))]
    merged_te = {r: {i: -float(v[0]) for i, v in cands_te[r].items()} for r in treqs}
    rows_t, rows_r, checks = {}, {}, []
    for seed in seeds:
        st = {}
        for t in TASKS:
            train(f"mt_st_{t}_{seed}" if seed != seed0 else f"mt_st_{t}", single_options(seed), label=t)
            st[t] = score(f"mt_st_{t}_{seed}" if seed != seed0 else f"mt_st_{t}", [None], "test")[None]
        mts = {}
        for op, fuse in (("A", mt_a), ("B", mt_b)):
            name = "mt_mt" if op == "A" or mt_b == mt_a else "mt_mt_b"
            info = train(name, multi_options(kept_experts, fuse, seed))
            sc = mts[op] = score(name, TASKS + ["fused"], "test")
            # The served fused score against Σ fuse·σ(task) of the served task scores.
            dev = max(abs(sc["fused"][r][i] - sum(fuse[t] * sc[t][r][i] for t in TASKS))
                      for r in treqs for i in sc["fused"][r])
            ex = explain_check(name, sc)
            checks.append((seed, op, info, dev, ex))
        sc = mts["A"]
        for t, m in task_metrics(st, cands_te, treqs).items():
            rows_t.setdefault((t, "single-task"), []).append(m)
        for t, m in task_metrics(sc, cands_te, treqs).items():
            rows_t.setdefault((t, "multi-task"), []).append(m)
        rows_r.setdefault("merged order (no pre-rank model)", []).append(ranking_metrics(merged_te, treqs, users_te, held_te))
        rows_r.setdefault("single-task liked model alone", []).append(ranking_metrics(st["liked"], treqs, users_te, held_te))
        rows_r.setdefault("multi-task, the liked task alone (model A)", []).append(
            ranking_metrics(sc["liked"], treqs, users_te, held_te))
        for op, sf, mf in (("A", st_a, mt_a), ("B", st_b, mt_b)):
            rows_r.setdefault(f"{op}: single-task sum Σ fuse·σ ({fuse_tag(sf)})", []).append(
                ranking_metrics(fused(st, sf, treqs, sigmoid), treqs, users_te, held_te))
            if sf != mf:
                # The same weights as the multi-task model's (the single-task models' epochs do
                # not depend on them): the two at one operating point.
                rows_r.setdefault(f"{op}: single-task sum at the multi-task's weights ({fuse_tag(mf)})", []).append(
                    ranking_metrics(fused(st, mf, treqs, sigmoid), treqs, users_te, held_te))
            rows_r.setdefault(f"{op}: multi-task fused, served ({fuse_tag(mf)})", []).append(
                ranking_metrics(mts[op]["fused"], treqs, users_te, held_te))
        print(f"(seed {seed} done, {time.time() - t_start:.0f} s)", file=sys.stderr, flush=True)
    mt_m = task_metrics({t: merged_te for t in TASKS}, cands_te, treqs)
    print(f"Test (the W2 log, {len(treqs)} requests; seeds {seeds}, test touched once per seed; mean ± sd over the seeds):")
    print()
    print("| task | model | AUC | HR@10 | requests with a positive |")
    print("|---|---|---|---|---|")
    for t in TASKS:
        print(f"| {t} | merged order (no model) | {mt_m[t][0]:.4f} | {mt_m[t][1]:.4f} | {mt_m[t][2]} |")
        for kind in ("single-task", "multi-task"):
            ms = rows_t[(t, kind)]
            print(f"| {t} | {kind}{' (' + kept_label + ')' if kind == 'multi-task' else ''} | {cell([m[0] for m in ms])} | "
                  f"{cell([m[1] for m in ms])} | {ms[0][2]} |")
    print()
    ceil_hr, ceil_neg, nu_hr, nu_neg = ranking_metrics({r: {i: 0.0 for i in cands_te[r]} for r in treqs}, treqs, users_te,
                                                       held_te, n=KEEP)
    print(f"The fused ranking's top 50 of the 300 candidates (HR@50: share of the held-out liked items, {nu_hr} users; "
          f"NEG@50: of the disliked items, {nu_neg} users, lower is better; the 300 candidates hold "
          f"{ceil_hr:.4f} / {ceil_neg:.4f} of them):")
    print()
    print("| ranking | HR@50 | NEG@50 |")
    print("|---|---|---|")
    for label, ms in rows_r.items():
        print(f"| {label} | {cell([m[0] for m in ms])} | {cell([m[1] for m in ms])} |")
    print()
    print("Checks: " + "; ".join(
        f"seed {s}, {op}: multi-task {i['parameters']} parameters, best epoch {i['best_epoch']}, {i['seconds']:.0f} s to train; "
        f"served fused − Σ fuse·σ(task) max |Δ| {d:.2e}; recommend_explain over 5 users ({e[1]} items, keys {e[2]}) "
        f"against prerank max |Δ| {e[0]:.2e}{f', {e[3]} not comparable' if e[3] else ''}"
        for s, op, i, d, e in checks) + ".")
    if not all(e[4] for *_, e in checks):
        print()
        print("(The recommend_explain check was skipped: this database's recommend_explain has no scores column, "
              "it was made by an older build; `make demo` makes it again.)")
    print()
    # The scoring pipelines go; the models, the recall pipelines and the mt_ tables stay.
    psql("SELECT count(*) FROM (SELECT twotower.drop_pipeline(name) FROM twotower.pipelines WHERE name LIKE 'mt\\_s\\_%') p;")
    single_secs = [v[1]["seconds"] for k, v in TRAINED.items() if k.startswith("mt_st_")]
    print(f"Runtime: {time.time() - t_start:.0f} s (recall and logs {t_recall:.0f} s, validation "
          f"{t_valid - t_recall:.0f} s; a single-task model trains in {statistics.mean(single_secs):.0f} s on average).")


if __name__ == "__main__":
    sys.exit(main())
