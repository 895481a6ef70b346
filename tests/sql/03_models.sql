-- Towers in SQL: import, golden outputs, versions, errors, privileges, item refresh, recall.
SET search_path = public, twotower;
\getenv golden TT_GOLDEN
\set VERBOSITY terse
-- err(q): runs q and shows the SQLSTATE, message and detail it fails with.
CREATE FUNCTION pg_temp.err(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE st text; msg text; det text;
BEGIN
    EXECUTE q;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL;
    RETURN st || ': ' || msg || coalesce(' | ' || nullif(det, ''), '');
END $$;
CREATE TEMP TABLE files AS
SELECT pg_read_file(:'golden' || '/spec.json')::jsonb AS spec,
       pg_read_binary_file(:'golden' || '/weights.safetensors') AS weights,
       pg_read_binary_file(:'golden' || '/item/weights.safetensors') AS item_weights,
       pg_read_file(:'golden' || '/item/spec.json')::jsonb AS item_spec;

-- Import from server files (superuser) and from bytea.
SELECT twotower.import_model_file('golden_user', :'golden' || '/spec.json', :'golden' || '/weights.safetensors');
-- The roles below run the model (a model runs only for its owner, twotower_admin and the roles
-- granted its usage; tests/sql/10_hardening.sql tests that).
SELECT twotower.grant_model_usage('golden_user', 'PUBLIC');
-- Hostile server files are refused before anything is read: missing (58P01), a device, a
-- directory, a FIFO (which would block forever).
COPY (SELECT 1) TO PROGRAM 'rm -f /tmp/pg_twotower_fifo; mkfifo /tmp/pg_twotower_fifo; cat > /dev/null';
SELECT pg_temp.err($q$SELECT twotower.import_model_file('x', '/no/such/spec.json', '/no/such/w')$q$);
SELECT pg_temp.err($q$SELECT twotower.import_model_file('x', '/dev/zero', '/dev/zero')$q$);
SELECT pg_temp.err($q$SELECT twotower.import_model_file('x', '/tmp', '/tmp')$q$);
SELECT pg_temp.err($q$SELECT twotower.import_model_file('x', '/tmp/pg_twotower_fifo', '/tmp/pg_twotower_fifo')$q$);
COPY (SELECT 1) TO PROGRAM 'rm -f /tmp/pg_twotower_fifo; cat > /dev/null';
SELECT twotower.import_model('golden_item', pg_read_file(:'golden' || '/item/spec.json')::jsonb,
                             pg_read_binary_file(:'golden' || '/item/weights.safetensors'));
SELECT name, version, active, kind, dim, metric, parameters, weight_bytes > 0 AS has_weights, features
  FROM twotower.models ORDER BY name, version;

-- Golden outputs: the independent numpy reference (tests/golden/tower_ref.py) to 1e-5.
CREATE TEMP TABLE golden AS
SELECT i.ord, i.x AS features, e.x AS expected
  FROM jsonb_array_elements(pg_read_file(:'golden' || '/inputs.json')::jsonb) WITH ORDINALITY AS i(x, ord)
  JOIN jsonb_array_elements(pg_read_file(:'golden' || '/expected.json')::jsonb) WITH ORDINALITY AS e(x, ord) USING (ord);
CREATE TEMP TABLE golden_diff AS
SELECT g.ord, max(abs(o.v - (e.v #>> '{}')::float8)) AS max_abs_diff,
       count(*) AS n, max(abs((e.v #>> '{}')::float8)) AS scale
  FROM golden g,
       LATERAL unnest(twotower.embed_user('golden_user', g.features)) WITH ORDINALITY AS o(v, j)
  JOIN LATERAL jsonb_array_elements(g.expected) WITH ORDINALITY AS e(v, j) USING (j)
 GROUP BY g.ord;
SELECT count(*) AS cases, sum(n) AS values,
       count(*) FILTER (WHERE max_abs_diff > 1e-5 * scale) AS beyond_1e5_relative,
       max(max_abs_diff) < 1e-6 AS all_within_1e6_absolute
  FROM golden_diff;
-- The same through the batched form.
SELECT count(*) AS batched_rows,
       count(*) FILTER (WHERE twotower.l2_distance(b.embedding, twotower.embed_user('golden_user', g.features)) > 1e-6) AS differ_from_single
  FROM twotower.embed_users('golden_user', (SELECT array_agg(features ORDER BY ord) FROM golden)) b
  JOIN golden g ON g.ord = b.ord;
SELECT ord, embedding IS NULL AS is_null FROM twotower.embed_users('golden_user', ARRAY['{}'::jsonb, NULL]);
-- A tower whose layers are a graph of named nodes (tests/golden/graph), against the reference,
-- and a malformed graph refused at import.
SELECT twotower.import_model('golden_graph', pg_read_file(:'golden' || '/graph/spec.json')::jsonb,
                             pg_read_binary_file(:'golden' || '/graph/weights.safetensors'));
SELECT count(*) AS graph_cases,
       count(*) FILTER (WHERE twotower.l2_distance(twotower.embed_user('golden_graph', i.x),
                                                   ARRAY(SELECT jsonb_array_elements_text(e.x)::real)) > 1e-5) AS beyond_1e5
  FROM jsonb_array_elements(pg_read_file(:'golden' || '/graph/inputs.json')::jsonb) WITH ORDINALITY AS i(x, ord)
  JOIN jsonb_array_elements(pg_read_file(:'golden' || '/graph/expected.json')::jsonb) WITH ORDINALITY AS e(x, ord) USING (ord);
SELECT name, kind, dim, metric, parameters FROM twotower.models WHERE name = 'golden_graph';
SELECT pg_temp.err(format($q$SELECT twotower.import_model('graph_cycle', %L::jsonb, %L::bytea)$q$,
       jsonb_set(pg_read_file(:'golden' || '/graph/spec.json')::jsonb, '{graph,8,inputs}', '["fused", "scaled", "both", "recent", "out"]'),
       pg_read_binary_file(:'golden' || '/graph/weights.safetensors')));
SELECT twotower.drop_model('golden_graph');
-- The item tower against its reference.
SELECT count(*) AS item_cases,
       count(*) FILTER (WHERE d > 1e-5) AS beyond_1e5
  FROM (SELECT max(abs(o.v - (e.v #>> '{}')::float8)) AS d
          FROM jsonb_array_elements(pg_read_file(:'golden' || '/item/inputs.json')::jsonb) WITH ORDINALITY AS i(x, ord)
          JOIN jsonb_array_elements(pg_read_file(:'golden' || '/item/expected.json')::jsonb) WITH ORDINALITY AS x(x, ord) USING (ord),
               LATERAL unnest(twotower.embed_item('golden_item', i.x)) WITH ORDINALITY AS o(v, j)
          JOIN LATERAL jsonb_array_elements(x.x) WITH ORDINALITY AS e(v, j) USING (j)
         GROUP BY ord) s;

-- Every documented invalid input is an ERROR with a SQLSTATE.
SELECT c.x ->> 'why' AS why,
       pg_temp.err(format('SELECT twotower.embed_user(%L, %L::jsonb)', 'golden_user', c.x -> 'features')) AS error
  FROM jsonb_array_elements(pg_read_file(:'golden' || '/invalid_inputs.json')::jsonb) AS c(x);
SELECT pg_temp.err($q$SELECT twotower.embed_user('golden_user', '{"no_such_feature": 1}')$q$);
SELECT pg_temp.err($q$SELECT twotower.embed_user('golden_user', '{"age": "28"}')$q$);
SELECT pg_temp.err($q$SELECT twotower.embed_user('golden_user', '{"age": 1e400}')$q$);
-- Errors name the argument and the cause: a spec nested too deeply or holding a number beyond
-- double precision is the spec's fault, not the features'.
SELECT pg_temp.err($q$SELECT twotower.import_model('deep', jsonb_set(spec, '{extra}', (repeat('{"a":', 200) || '1' || repeat('}', 200))::jsonb), weights) FROM files$q$);
SELECT pg_temp.err($q$SELECT twotower.import_model('huge', jsonb_set(spec, '{features,11,default}', '1e400'), weights) FROM files$q$);
SELECT pg_temp.err($q$SELECT twotower.embed_user('golden_user', jsonb_build_object('age', (repeat('[', 200) || repeat(']', 200))::jsonb))$q$);
-- A deeply nested or out-of-range value under a key that is not a feature is never read
-- (item rows carry other columns): embed_item ignores it.
SELECT twotower.embed_item('golden_item', jsonb_build_object('category', 'shoes',
         'notes', (repeat('{"a":', 200) || '1' || repeat('}', 200))::jsonb, 'blob', '1e400'::jsonb))
     = twotower.embed_item('golden_item', '{"category": "shoes"}') AS other_columns_ignored;
SELECT pg_temp.err($q$SELECT twotower.embed_user('golden_user', '{"history": [1, 2.5]}')$q$);
SELECT pg_temp.err($q$SELECT twotower.embed_user('golden_user', '[1, 2]')$q$);
SELECT pg_temp.err($q$SELECT twotower.embed_user('golden_user', jsonb_build_object('history', (SELECT jsonb_agg(i) FROM generate_series(1, 100001) i)))$q$);
SELECT pg_temp.err($q$SELECT twotower.embed_user('no_such_model', '{}')$q$);
SELECT pg_temp.err($q$SELECT twotower.embed_user('golden_item', '{}')$q$);
SELECT pg_temp.err($q$SELECT twotower.embed_item('golden_user', '{}')$q$);
-- Broken weights and specs are rejected at import, naming what is wrong.
SELECT pg_temp.err($q$SELECT twotower.import_model('broken', spec, substring(weights from 1 for 500)) FROM files$q$);
SELECT pg_temp.err($q$SELECT twotower.import_model('broken', spec, '\x00'::bytea) FROM files$q$);
SELECT pg_temp.err($q$SELECT twotower.import_model('broken', spec, substring(weights from 1 for 8) || '\x7b7d'::bytea) FROM files$q$);
-- a flipped byte inside the data: a NaN/huge value or a shape change is caught
SELECT pg_temp.err($q$SELECT twotower.import_model('broken', spec,
         overlay(weights placing '\xffffffff'::bytea from length(weights) - 3)) FROM files$q$);
SELECT pg_temp.err($q$SELECT twotower.import_model('broken', spec, item_weights) FROM files$q$);
SELECT pg_temp.err($q$SELECT twotower.import_model('broken', spec || '{"spec_version": 2}', weights) FROM files$q$);
SELECT pg_temp.err($q$SELECT twotower.import_model('broken', jsonb_set(spec, '{output,dim}', '9'), weights) FROM files$q$);
SELECT pg_temp.err($q$SELECT twotower.import_model('broken', jsonb_set(spec, '{features,0,type}', '"categorial"'), weights) FROM files$q$);
SELECT pg_temp.err($q$SELECT twotower.import_model('broken', spec - 'layers', weights) FROM files$q$);
SELECT pg_temp.err($q$SELECT twotower.import_model('bad name!', spec, weights) FROM files$q$);
SELECT count(*) AS broken_models FROM twotower.models WHERE name = 'broken';

-- Versions: import without activating, switch atomically, drop.
SELECT twotower.import_model('golden_user', pg_read_file(:'golden' || '/spec.json')::jsonb,
                             pg_read_binary_file(:'golden' || '/weights.safetensors'), activate => false);
SELECT version, active FROM twotower.models WHERE name = 'golden_user' ORDER BY version;
SELECT twotower.activate_model('golden_user', 2);
SELECT pg_temp.err($q$SELECT twotower.activate_model('golden_user', 7)$q$);
SELECT version, active FROM twotower.models WHERE name = 'golden_user' ORDER BY version;
SELECT pg_temp.err($q$SELECT twotower.drop_model('golden_user', 2)$q$);
SELECT twotower.drop_model('golden_user', 1);
SELECT version, active FROM twotower.models WHERE name = 'golden_user' ORDER BY version;
SELECT count(*) AS golden_still_served FROM golden
 WHERE twotower.embed_user('golden_user', features) IS NOT NULL;
-- A switch is seen by this backend's model cache at once, and a rolled-back switch is undone.
SELECT twotower.import_model('switch', spec, weights) FROM files;
SELECT twotower.import_model('switch', item_spec, item_weights, activate => false) FROM files;
SELECT vector_dims(twotower.embed_user('switch', '{}')) AS v1_serves;
SELECT twotower.activate_model('switch', 2);
SELECT pg_temp.err($q$SELECT twotower.embed_user('switch', '{}')$q$);
BEGIN;
SELECT twotower.activate_model('switch', 1);
SELECT vector_dims(twotower.embed_user('switch', '{}')) AS v1_serves_in_transaction;
ROLLBACK;
SELECT pg_temp.err($q$SELECT twotower.embed_user('switch', '{}')$q$);
SELECT twotower.drop_model('switch');
SELECT pg_temp.err($q$SELECT twotower.embed_item('switch', '{}')$q$);
SELECT models FROM twotower.model_cache_info();

-- Privileges: inference needs only EXECUTE; importing needs twotower_admin or the model's owner.
CREATE ROLE tt_alice;
CREATE ROLE tt_bob;
GRANT SELECT ON files TO tt_alice, tt_bob;
SET ROLE tt_alice;
SELECT vector_dims(twotower.embed_user('golden_user', '{}')) AS alice_can_embed;
SELECT pg_temp.err($q$SELECT twotower.import_model('alice_model', spec, weights) FROM files$q$);
SELECT pg_temp.err($q$SELECT twotower.activate_model('golden_user', 2)$q$);
SELECT pg_temp.err($q$SELECT twotower.drop_model('golden_user')$q$);
SELECT pg_temp.err($q$SELECT count(*) FROM twotower.model_version$q$);
SELECT pg_temp.err($q$SELECT twotower.import_model_file('alice_model', 'x', 'y')$q$);
RESET ROLE;
GRANT twotower_admin TO tt_alice;
SET ROLE tt_alice;
SELECT twotower.import_model('alice_model', spec, weights) FROM files;
SELECT twotower.activate_model('alice_model', 1);
RESET ROLE;
REVOKE twotower_admin FROM tt_alice;
SET ROLE tt_alice;
-- still the owner of her model
SELECT twotower.import_model('alice_model', spec, weights) FROM files;
SET ROLE tt_bob;
SELECT pg_temp.err($q$SELECT twotower.activate_model('alice_model', 1)$q$);
SELECT pg_temp.err($q$SELECT twotower.drop_model('alice_model')$q$);
SELECT pg_temp.err($q$SELECT twotower.import_model('alice_model', spec, weights) FROM files$q$);
RESET ROLE;
SELECT name, version, active, owner, imported_by FROM twotower.models WHERE name = 'alice_model' ORDER BY version;
SELECT twotower.drop_model('alice_model');
SELECT pg_temp.err($q$SELECT twotower.drop_model('alice_model')$q$);

-- Owners are roles, not names: DROP ROLE is refused while a role owns models, a rename is
-- followed, and a new role with the old name owns nothing.
SELECT twotower.import_model('alice_model', spec, weights) FROM files;
SELECT twotower.alter_model_owner('alice_model', 'tt_alice');
SELECT regexp_replace(pg_temp.err($q$DROP ROLE tt_alice$q$), 'large object \d+', 'large object N') AS err;
ALTER ROLE tt_alice RENAME TO tt_alice_renamed;
CREATE ROLE tt_alice;
GRANT SELECT ON files TO tt_alice;
SELECT DISTINCT owner FROM twotower.models WHERE name = 'alice_model';
SET ROLE tt_alice;
SELECT pg_temp.err($q$SELECT twotower.drop_model('alice_model')$q$);
SELECT pg_temp.err($q$SELECT twotower.import_model('alice_model', spec, weights) FROM files$q$);
SET ROLE tt_alice_renamed;
-- The owner may give the model only to a role it is a member of.
SELECT pg_temp.err($q$SELECT twotower.alter_model_owner('alice_model', 'tt_bob')$q$);
SELECT twotower.import_model('alice_model', spec, weights, activate => false) FROM files;
RESET ROLE;
-- REASSIGN OWNED hands models over; DROP OWNED leaves them to twotower_admin.
REASSIGN OWNED BY tt_alice_renamed TO tt_bob;
SELECT DISTINCT owner FROM twotower.models WHERE name = 'alice_model';
DROP OWNED BY tt_bob;
SELECT DISTINCT coalesce(owner::text, 'none') AS owner FROM twotower.models WHERE name = 'alice_model';
SET ROLE tt_bob;
SELECT pg_temp.err($q$SELECT twotower.activate_model('alice_model', 2)$q$);
RESET ROLE;
DROP OWNED BY tt_alice_renamed;
DROP ROLE tt_alice_renamed;
SELECT twotower.drop_model('alice_model');
SELECT pg_temp.err($q$SELECT twotower.drop_model(NULL)$q$);
SELECT pg_temp.err($q$SELECT twotower.alter_model(NULL, 'ignore')$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.export_model(NULL)$q$);

-- Unknown feature keys: an error by default (typos are caught); 'ignore' per model, without a
-- re-import, so an application already sending a newer version's keys survives a rollback.
SELECT pg_temp.err($q$SELECT twotower.embed_user('golden_user', '{"country": "fr", "new_feature": 1}')$q$);
SELECT twotower.alter_model('golden_user', unknown_features => 'ignore');
SELECT twotower.embed_user('golden_user', '{"country": "fr", "new_feature": 1}')
     = twotower.embed_user('golden_user', '{"country": "fr"}') AS unknown_key_ignored;
SELECT count(*) AS embedded FROM twotower.embed_users('golden_user', ARRAY['{"new_feature": 1}'::jsonb]);
SELECT DISTINCT unknown_features FROM twotower.models WHERE name = 'golden_user';
SELECT pg_temp.err($q$SELECT twotower.alter_model('golden_user', unknown_features => 'warn')$q$);
SET ROLE tt_bob;
SELECT pg_temp.err($q$SELECT twotower.alter_model('golden_user', unknown_features => 'error')$q$);
RESET ROLE;
SELECT twotower.alter_model('golden_user', unknown_features => 'error');
SELECT pg_temp.err($q$SELECT twotower.embed_user('golden_user', '{"new_feature": 1}')$q$);

-- export_model gives back exactly what was imported: a re-import is the same model.
SELECT twotower.import_model('golden_copy', e.spec, e.weights)
  FROM twotower.export_model('golden_user') e;
SELECT a.checksum = b.checksum AS same_checksum, a.weights = b.weights AS same_weights, a.spec = b.spec AS same_spec
  FROM twotower.model_version a, twotower.model_version b
 WHERE a.model = 'golden_user' AND a.version = (SELECT active_version FROM twotower.model WHERE name = 'golden_user')
   AND b.model = 'golden_copy';
SELECT count(*) AS differ FROM golden
 WHERE twotower.embed_user('golden_copy', features) <> twotower.embed_user('golden_user', features);
SELECT e.version = m.active_version AS active_exported
  FROM twotower.export_model('golden_user') e, twotower.model m WHERE m.name = 'golden_user';
SELECT pg_temp.err($q$SELECT * FROM twotower.export_model('golden_user', 99)$q$);
SET ROLE tt_bob;
SELECT pg_temp.err($q$SELECT * FROM twotower.export_model('golden_user')$q$);
RESET ROLE;
SELECT twotower.drop_model('golden_copy');

-- The nightly item refresh: item tower over a table into a vector table, then the index.
CREATE TABLE catalog_items (item_id bigint PRIMARY KEY, title text, category text, tags text[],
                            price numeric, img_vec real[]);
INSERT INTO catalog_items
SELECT (x ->> 'item_id')::bigint, x ->> 'title', x ->> 'category',
       ARRAY(SELECT jsonb_array_elements_text(x -> 'tags')), (x ->> 'price')::numeric,
       ARRAY(SELECT jsonb_array_elements_text(x -> 'img_vec'))::real[]
  FROM (SELECT DISTINCT ON (x ->> 'item_id') x
          FROM jsonb_array_elements(pg_read_file(:'golden' || '/item/inputs.json')::jsonb) AS x) d
 WHERE x ->> 'item_id' IS NOT NULL AND jsonb_typeof(x -> 'tags') = 'array'
   AND jsonb_typeof(x -> 'img_vec') = 'array' AND jsonb_array_length(x -> 'img_vec') = 3;
INSERT INTO catalog_items
SELECT 5000 + i, 'generated ' || i, (ARRAY['shoes', 'shirts', 'hats', 'bags', 'other'])[1 + i % 5],
       ARRAY[(ARRAY['red', 'blue', 'sale', 'new', 'eco', 'kids'])[1 + i % 6]], 10 + i % 90,
       ARRAY[sin(i), cos(i), sin(2 * i)]::real[]
  FROM generate_series(1, 2000) i;
CREATE TABLE item_vectors (id bigint PRIMARY KEY, embedding real[]);
-- Returns what it did: every item inserted the first time.
SELECT inserted = (SELECT count(*) FROM catalog_items) AS all_inserted, updated, deleted, unchanged
  FROM twotower.refresh_item_vectors('golden_item', 'catalog_items', 'item_vectors',
                                     id_column => 'item_id', batch_size => 128);
-- Stored vectors equal embed_item on the same rows (batched and single passes round alike
-- to within f32 accumulation order).
SELECT count(*) AS differ FROM catalog_items c JOIN item_vectors v ON v.id = c.item_id
 WHERE twotower.l2_distance(v.embedding, twotower.embed_item('golden_item', to_jsonb(c))) > 1e-6;
-- A second run writes nothing: unchanged vectors are not rewritten (no new row versions).
CREATE TEMP TABLE before_ctid AS SELECT id, ctid AS tid FROM item_vectors;
SELECT inserted, updated, deleted, unchanged = (SELECT count(*) FROM catalog_items) AS all_unchanged
  FROM twotower.refresh_item_vectors('golden_item', 'catalog_items', 'item_vectors', id_column => 'item_id');
SELECT count(*) AS rows_rewritten FROM item_vectors v JOIN before_ctid b USING (id) WHERE v.ctid <> b.tid;
-- Changed items are updated, new ones inserted, and items that left the catalogue deleted.
UPDATE catalog_items SET price = price + 100 WHERE item_id IN (5001, 5002);
DELETE FROM catalog_items WHERE item_id IN (5003, 5004, 5005);
INSERT INTO catalog_items VALUES (9001, 'new', 'hats', ARRAY['new'], 12, ARRAY[0.1, 0.2, 0.3]::real[]);
SELECT inserted, updated, deleted, unchanged = (SELECT count(*) - 3 FROM catalog_items) AS rest_unchanged
  FROM twotower.refresh_item_vectors('golden_item', 'catalog_items', 'item_vectors', id_column => 'item_id');
SELECT count(*) = (SELECT count(*) FROM catalog_items) AS one_row_per_item,
       count(*) FILTER (WHERE id IN (5003, 5004, 5005)) AS vanished_kept
  FROM item_vectors;
-- delete_missing => false keeps vectors of vanished items.
DELETE FROM catalog_items WHERE item_id = 9001;
SELECT inserted, updated, deleted FROM twotower.refresh_item_vectors('golden_item', 'catalog_items', 'item_vectors',
       id_column => 'item_id', delete_missing => false);
SELECT count(*) AS kept FROM item_vectors WHERE id = 9001;
DELETE FROM item_vectors WHERE id = 9001;
-- Without a unique index on the target's id, rows are still matched by id.
CREATE TABLE plain_vectors (id bigint, embedding real[]);
SELECT inserted = (SELECT count(*) FROM catalog_items) AS all_inserted, updated, deleted, unchanged
  FROM twotower.refresh_item_vectors('golden_item', 'catalog_items', 'plain_vectors', id_column => 'item_id');
UPDATE catalog_items SET price = price + 1 WHERE item_id = 5001;
SELECT inserted, updated, deleted, unchanged = (SELECT count(*) - 1 FROM catalog_items) AS rest_unchanged
  FROM twotower.refresh_item_vectors('golden_item', 'catalog_items', 'plain_vectors', id_column => 'item_id');
SELECT count(*) = count(DISTINCT id) AS no_duplicates FROM plain_vectors;
DROP TABLE plain_vectors;
SELECT * FROM twotower.refresh_item_vectors('golden_item', 'catalog_items', 'item_vectors', id_column => 'item_id');
-- The function a refresh between co-located Citus tables ships the model to (tests/t/018):
-- files that do not match their checksum are refused; NULL in, NULL out.
SELECT pg_temp.err($q$SELECT twotower.embed_item_shipped(1, '{}', '\x00', 1, '{}')$q$);
SELECT twotower.embed_item_shipped(1, NULL, '\x00', 1, '{}') IS NULL AS strict;
SELECT pg_temp.err($q$SELECT twotower.refresh_item_vectors('golden_user', 'catalog_items', 'item_vectors', id_column => 'item_id')$q$);
SELECT pg_temp.err($q$SELECT twotower.refresh_item_vectors('golden_item', 'catalog_items', 'item_vectors', id_column => 'nope')$q$);
SELECT pg_temp.err($q$SELECT twotower.refresh_item_vectors('golden_item', 'catalog_items', 'item_vectors', id_column => 'item_id', batch_size => 0)$q$);

-- Feature columns named like the aliases of the refresh's own statement (f, t, s, x) are read
-- as the source's columns.
SELECT twotower.import_model('alias_item', '{"format": "pg_twotower.tower", "spec_version": 1, "kind": "item",
  "features": [{"name": "f", "type": "dense", "dim": 2}, {"name": "t", "type": "dense", "dim": 1},
               {"name": "s", "type": "dense", "dim": 1}, {"name": "x", "type": "dense", "dim": 1}],
  "layers": [], "output": {"dim": 5, "metric": "l2"}}', '\x02000000000000007b7d'::bytea);
CREATE TABLE alias_items (id bigint PRIMARY KEY, f real[], t real[], s real[], x real[]);
INSERT INTO alias_items VALUES (1, '{1,2}', '{3}', '{4}', '{5}'), (2, '{6,7}', '{8}', '{9}', '{10}');
CREATE TABLE alias_vectors (id bigint PRIMARY KEY, embedding real[]);
SELECT inserted, updated, deleted, unchanged FROM twotower.refresh_item_vectors('alias_item', 'alias_items', 'alias_vectors');
SELECT id, embedding FROM alias_vectors ORDER BY id;
DROP TABLE alias_items, alias_vectors;
SELECT twotower.drop_model('alias_item');

-- Items may come from a view. A feature without a column is an error (every item would get
-- the same missing value), unless the spec gives that feature a default.
CREATE VIEW items_no_price AS SELECT item_id, category, tags, img_vec FROM catalog_items;
CREATE TABLE no_price_vectors (id bigint, embedding real[]);
SELECT pg_temp.err($q$SELECT twotower.refresh_item_vectors('golden_item', 'items_no_price', 'no_price_vectors', id_column => 'item_id')$q$);
CREATE VIEW items_nothing AS SELECT item_id FROM catalog_items;
SELECT pg_temp.err($q$SELECT twotower.refresh_item_vectors('golden_item', 'items_nothing', 'no_price_vectors', id_column => 'item_id')$q$);
SELECT count(*) AS written_by_failed_refreshes FROM no_price_vectors;
SELECT twotower.import_model('item_price_default',
       jsonb_set(item_spec, '{features,3}', (item_spec #> '{features,3}') || '{"default": 20}'), item_weights)
  FROM files;
SELECT inserted = (SELECT count(*) FROM catalog_items) AS all_inserted
  FROM twotower.refresh_item_vectors('item_price_default', 'items_no_price', 'no_price_vectors', id_column => 'item_id');
SELECT count(*) AS differ FROM catalog_items c JOIN no_price_vectors v ON v.id = c.item_id
 WHERE twotower.l2_distance(v.embedding, twotower.embed_item('golden_item', to_jsonb(c) || '{"price": 20}')) > 1e-6;
SELECT twotower.drop_model('item_price_default');
DROP VIEW items_no_price, items_nothing;
DROP TABLE no_price_vectors;

-- A long refresh is cancellable (statement_timeout, like a user's cancel request): it ends at
-- the timeout, within 3 s (10 times the timeout), on the server's clock; uncancelled, the
-- refresh of these 500 000 items runs for tens of seconds.
CREATE TABLE many_items AS
SELECT i AS item_id, 'shoes'::text AS category, ARRAY['red']::text[] AS tags, 10 + i % 90 AS price,
       ARRAY[0.1, 0.2, 0.3]::real[] AS img_vec
  FROM generate_series(1, 500000) i;
CREATE TABLE many_vectors (id bigint PRIMARY KEY, embedding real[]);
SELECT clock_timestamp() AS cancel_start \gset
SET statement_timeout = '300ms';
SELECT * FROM twotower.refresh_item_vectors('golden_item', 'many_items', 'many_vectors', id_column => 'item_id');
RESET statement_timeout;
SELECT clock_timestamp() - :'cancel_start'::timestamptz BETWEEN interval '300 ms' AND interval '3 s' AS stopped_at_the_timeout;
SELECT count(*) AS rows_after_cancel FROM many_vectors;
DROP TABLE many_items, many_vectors;

-- One-call recall: user tower + the index, with exclusions.
CREATE INDEX item_vectors_idx ON item_vectors USING twotower_hnsw (embedding real_cosine_ops);
CREATE TEMP TABLE u AS SELECT features FROM golden WHERE ord = 1;
SELECT count(*) AS k, min(rank) AS first_rank, max(rank) AS last_rank,
       bool_and(score BETWEEN -1.0001 AND 1.0001) AS scores_are_cosines
  FROM u, twotower.recall('golden_user', 'item_vectors_idx', u.features, 50) r;
-- Ranked by descending score, and equal to exact search.
SELECT count(*) AS out_of_order FROM (
  SELECT score, lag(score) OVER (ORDER BY rank) AS prev
    FROM u, twotower.recall('golden_user', 'item_vectors_idx', u.features, 50)) s
 WHERE score > prev + 1e-6;
SELECT count(*) AS common_with_exact FROM
  (SELECT r.item_id FROM u, twotower.recall('golden_user', 'item_vectors_idx', u.features, 20) r) a
  JOIN (SELECT v.id FROM item_vectors v, u
         ORDER BY twotower.cosine_distance(v.embedding, twotower.embed_user('golden_user', u.features)), v.id LIMIT 20) b
    ON a.item_id = b.id;
-- Exclusions are left out and k is still met.
CREATE TEMP TABLE top AS SELECT r.item_id FROM u, twotower.recall('golden_user', 'item_vectors_idx', u.features, 10) r;
SELECT count(*) AS k, count(*) FILTER (WHERE item_id IN (SELECT item_id FROM top)) AS excluded_returned
  FROM u, twotower.recall('golden_user', 'item_vectors_idx', u.features, 10,
                          exclude => (SELECT array_agg(item_id) FROM top)) r;
-- A per-call ef_search (here far beyond the table: an exact pass) gives the exact top 20.
SELECT count(*) AS common_with_exact_at_high_ef FROM
  (SELECT r.item_id FROM u, twotower.recall('golden_user', 'item_vectors_idx', u.features, 20, ef_search => 5000) r) a
  JOIN (SELECT v.id FROM item_vectors v, u
         ORDER BY twotower.cosine_distance(v.embedding, (SELECT twotower.embed_user('golden_user', u.features))), v.id LIMIT 20) b
    ON a.item_id = b.id;
SELECT pg_temp.err($q$SELECT * FROM u, twotower.recall('golden_user', 'item_vectors_idx', u.features, 5, ef_search => 0)$q$);
-- Deleted items never come back; new ones are found at once.
DELETE FROM item_vectors WHERE id IN (SELECT item_id FROM top);
SELECT count(*) FILTER (WHERE item_id IN (SELECT item_id FROM top)) AS deleted_returned
  FROM u, twotower.recall('golden_user', 'item_vectors_idx', u.features, 10) r;
INSERT INTO item_vectors SELECT 999999, twotower.embed_user('golden_user', features) FROM u;
SELECT item_id, rank, round(score::numeric, 4) AS score
  FROM u, twotower.recall('golden_user', 'item_vectors_idx', u.features, 1) r;
-- Usable in joins.
SELECT count(*) AS joined FROM u, twotower.recall('golden_user', 'item_vectors_idx', u.features, 25) r
  JOIN catalog_items c ON c.item_id = r.item_id;
-- Mismatches are clear errors.
CREATE TABLE l2_items (id bigint PRIMARY KEY, embedding real[]);
INSERT INTO l2_items SELECT id, embedding FROM item_vectors;
CREATE INDEX l2_items_idx ON l2_items USING twotower_hnsw (embedding real_l2_ops);
SELECT pg_temp.err($q$SELECT * FROM u, twotower.recall('golden_user', 'l2_items_idx', u.features, 5)$q$);
CREATE TABLE wide_items (id bigint PRIMARY KEY, embedding real[]);
INSERT INTO wide_items SELECT id, embedding || ARRAY[0.5::real] FROM item_vectors;
CREATE INDEX wide_items_idx ON wide_items USING twotower_hnsw (embedding);
SELECT pg_temp.err($q$SELECT * FROM u, twotower.recall('golden_user', 'wide_items_idx', u.features, 5)$q$);
SELECT pg_temp.err($q$SELECT * FROM u, twotower.recall('golden_user', 'item_vectors', u.features, 5)$q$);
SELECT pg_temp.err($q$SELECT * FROM u, twotower.recall('golden_user', 'item_vectors_idx', u.features, 0)$q$);
SELECT pg_temp.err($q$SELECT * FROM u, twotower.recall('golden_item', 'item_vectors_idx', u.features, 5)$q$);
CREATE TABLE nopk_items (id bigint, embedding real[]);
INSERT INTO nopk_items SELECT id, embedding FROM item_vectors;
CREATE INDEX nopk_items_idx ON nopk_items USING twotower_hnsw (embedding);
SELECT pg_temp.err($q$SELECT * FROM u, twotower.recall('golden_user', 'nopk_items_idx', u.features, 5)$q$);
-- Reading the table needs SELECT on it.
GRANT SELECT ON u TO tt_bob;
SET ROLE tt_bob;
SELECT pg_temp.err($q$SELECT * FROM u, twotower.recall('golden_user', 'item_vectors_idx', u.features, 5)$q$);
RESET ROLE;
GRANT SELECT ON item_vectors TO tt_bob;
SET ROLE tt_bob;
SELECT count(*) AS bob_recalls FROM u, twotower.recall('golden_user', 'item_vectors_idx', u.features, 5);
RESET ROLE;

DROP TABLE catalog_items, item_vectors, l2_items, wide_items, nopk_items;
SELECT twotower.drop_model('golden_user');
SELECT twotower.drop_model('golden_item');
SELECT count(*) AS models_left FROM twotower.models;
DROP OWNED BY tt_alice, tt_bob;
DROP ROLE tt_alice;
DROP ROLE tt_bob;

-- An item tower whose output is not finite: 22003 for one item (embed_item returned Infinity)
-- as for a refresh (which said 22023); a source row without an id is 22004 (was 22023).
CREATE FUNCTION pg_temp.st(h text, d bytea) RETURNS bytea LANGUAGE sql AS $$
    SELECT set_byte(set_byte('\x0000000000000000'::bytea, 0, length(convert_to(h, 'UTF8')) % 256), 1,
                    length(convert_to(h, 'UTF8')) / 256) || convert_to(h, 'UTF8') || d $$;
SELECT twotower.import_model('huge_item', '{"format": "pg_twotower.tower", "spec_version": 1, "kind": "item",
  "features": [{"name": "x", "type": "numeric", "transform": "none"}],
  "layers": [{"type": "linear", "weight": "w"}], "output": {"dim": 1, "metric": "ip"}}',
  pg_temp.st('{"w":{"dtype":"F32","shape":[1,1],"data_offsets":[0,4]}}', '\xe6b1617f'));
SELECT twotower.embed_item('huge_item', '{"x": 1}') AS finite;
SELECT pg_temp.err($q$SELECT twotower.embed_item('huge_item', '{"x": 1e10}')$q$);
CREATE TABLE huge_items (id bigint, x real);
INSERT INTO huge_items VALUES (1, 1), (2, 1e10);
CREATE TABLE huge_vectors (id bigint PRIMARY KEY, embedding real[]);
SELECT pg_temp.err($q$SELECT * FROM twotower.refresh_item_vectors('huge_item', 'huge_items', 'huge_vectors')$q$);
UPDATE huge_items SET x = 1, id = NULL WHERE id = 2;
SELECT pg_temp.err($q$SELECT * FROM twotower.refresh_item_vectors('huge_item', 'huge_items', 'huge_vectors')$q$);
DROP TABLE huge_items, huge_vectors;
SELECT twotower.drop_model('huge_item');
