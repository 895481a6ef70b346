-- twotower.model_cache_size: decoded models are kept per backend, the least recently used
-- leaving first once their memory exceeds the setting; the model in use always stays; a model
-- that left is decoded again (and counted again) when it is used.
SET search_path = public, twotower;
\set VERBOSITY terse
CREATE FUNCTION pg_temp.err(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE st text; msg text;
BEGIN
    EXECUTE q;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
    RETURN st || ': ' || msg;
END $$;
-- A safetensors file from its JSON header and data (header shorter than 64 KiB).
CREATE FUNCTION pg_temp.st(h text, d bytea) RETURNS bytea LANGUAGE sql AS $$
    SELECT set_byte(set_byte('\x0000000000000000'::bytea, 0, length(convert_to(h, 'UTF8')) % 256), 1,
                    length(convert_to(h, 'UTF8')) / 256) || convert_to(h, 'UTF8') || d $$;

-- User towers whose one weight is [rows, 1024] float32 zeros, so a decoded model holds rows ·
-- 4 KiB (and a few hundred bytes more): mc_a 512 KiB, mc_b 256 KiB, mc_c 384 KiB, mc_d 1280 KiB.
-- The cache as model_cache_info() reports it: models, and bytes in units of 128 KiB (mc_a is 4,
-- mc_b 2, mc_c 3, mc_d 10); a budget of 1 MB is 8 units.
CREATE FUNCTION pg_temp.tower(name text, rows int) RETURNS int LANGUAGE sql AS $$
  SELECT twotower.import_model(name, format('{"format": "pg_twotower.tower", "spec_version": 1, "kind": "user",
    "features": [{"name": "q", "type": "dense", "dim": 1024}], "layers": [{"type": "linear", "weight": "w"}],
    "output": {"dim": %s, "metric": "ip"}}', rows)::jsonb,
    pg_temp.st(format('{"w":{"dtype":"F32","shape":[%s,1024],"data_offsets":[0,%s]}}', rows, rows * 4096),
               decode(repeat('00', rows * 4096), 'hex'))) $$;
SELECT pg_temp.tower('mc_a', 128), pg_temp.tower('mc_b', 64), pg_temp.tower('mc_c', 96), pg_temp.tower('mc_d', 320);
-- Embeds with a model (its output width names it), then reports the cache.
CREATE FUNCTION pg_temp.use(model text, OUT dim int, OUT models bigint, OUT units_of_128k numeric) LANGUAGE plpgsql AS $$
BEGIN
    dim := cardinality(twotower.embed_user(model, jsonb_build_object('q', array_fill(1, ARRAY[1024]))));
    SELECT c.models, round(c.bytes / 131072.0, 1) INTO models, units_of_128k FROM twotower.model_cache_info() c;
END $$;
SELECT models AS models_at_start FROM twotower.model_cache_info();
SET twotower.model_cache_size = '1MB';
SELECT * FROM pg_temp.use('mc_a');
SELECT * FROM pg_temp.use('mc_b');
-- mc_a again: now the most recently used. Then mc_c: 9 units is over the budget, and mc_b,
-- the least recently used, leaves: mc_a and mc_c stay (7 units).
SELECT * FROM pg_temp.use('mc_a');
SELECT * FROM pg_temp.use('mc_c');
-- mc_d alone is over the budget: every other model leaves, mc_d (in use) stays.
SELECT * FROM pg_temp.use('mc_d');
-- With room for all of them, the three that left are decoded again and all four are kept
-- (19 units).
SET twotower.model_cache_size = '64MB';
SELECT dim FROM pg_temp.use('mc_a');
SELECT dim FROM pg_temp.use('mc_b');
SELECT dim FROM pg_temp.use('mc_c');
SELECT models, round(bytes / 131072.0, 1) AS units_of_128k FROM twotower.model_cache_info();
RESET twotower.model_cache_size;
SELECT pg_temp.err('SET twotower.model_cache_size = 0');
SELECT twotower.drop_model(m) FROM unnest(ARRAY['mc_a', 'mc_b', 'mc_c', 'mc_d']) m;
-- A dropped model is gone, cached or not.
SELECT pg_temp.err($$SELECT twotower.embed_user('mc_a', '{}')$$);
