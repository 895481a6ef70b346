# pg_dump / pg_restore reproduce the index and its results.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TwoTower;

my $node = new_node('dump', conf => ['twotower.ef_search = 400'], dbs => ['src']);
make_items($node, 'src', 'items', 5000, 16);
$node->safe_psql('src', q{
	CREATE INDEX items_idx ON items USING twotower_hnsw (v real_l2_ops) WITH (m = 12, ef_construction = 80, quantization = 'f16');
	INSERT INTO items (category, v) SELECT 2, array_fill(3::real, ARRAY[16]);
	DELETE FROM items WHERE id % 11 = 0;
});
# Models: two versions (the second not active) are dumped with the extension's tables.
my $g = $ENV{TT_GOLDEN};
$node->safe_psql('src', qq{
	SELECT twotower.import_model_file('u', '$g/spec.json', '$g/weights.safetensors');
	SELECT twotower.import_model_file('u', '$g/spec.json', '$g/weights.safetensors', false);
	SELECT twotower.import_model_file('i', '$g/item/spec.json', '$g/item/weights.safetensors');
});
# A channel: its neighbour table is the owner's table, its catalogue row the extension's.
$node->safe_psql('src', q{
	CREATE TABLE log AS SELECT 'u' || (g % 50) AS user_id, (g * 7 % 40)::bigint AS item_id, g::float8 AS ts
	  FROM generate_series(1, 600) g;
	SELECT * FROM twotower.build_channel('sw', 'swing', 'log', 'sw_nb', '{"top_n": 5}', time_column => 'ts');
});
# A pipeline over the channel (owned through an owner object, like a model).
$node->safe_psql('src', q{
	SELECT twotower.save_pipeline('p', '{"user_model": "u", "vectors": {"table": "items", "vector_column": "v"},
	  "history": "history", "channels": [{"type": "i2i", "channel": "sw", "k": 10}], "k": 5}');
});
# An item-cached partitioned table: the cache trigger is on every partition, and a restore
# (which recreates each partition's trigger itself) must not collide with the event trigger
# that gives new partitions the trigger.
$node->safe_psql('src', q{
	CREATE TABLE pf (id bigint, embedding real[]) PARTITION BY RANGE (id);
	CREATE TABLE pf_1 PARTITION OF pf FOR VALUES FROM (0) TO (100);
	SELECT twotower.enable_item_cache('pf');
	CREATE TABLE pf_2 PARTITION OF pf FOR VALUES FROM (100) TO (200);
});
my $cache_triggers = q{SELECT string_agg(tgrelid::regclass::text || ':' || tgenabled::text, ',' ORDER BY tgrelid::regclass::text)
	FROM pg_trigger WHERE tgname = 'twotower_item_cache'};
is($node->safe_psql('src', $cache_triggers), 'pf:A,pf_1:A,pf_2:A', 'the cache trigger is on every partition');
my $pipelines = 'SELECT name, owner, definition FROM twotower.pipelines';
my $recommend = q{SELECT string_agg(item_id || ':' || rank || ':' || array_to_string(channels, '+'), ' ' ORDER BY rank)
	FROM twotower.recommend('p', '{"user_id": 42, "history": [7, 14]}')};
my $channels = 'SELECT name, kind, neighbors, owner, interactions, options, rows FROM twotower.channels';
my $i2i = q{SELECT string_agg(item_id || ':' || rank || ':' || via, ' ' ORDER BY rank)
	FROM twotower.i2i_recall('sw', ARRAY[7, 14]::bigint[], k => 10)};
my $embed = q{SELECT string_agg(twotower.embed_user('u', x)::text, ' ' ORDER BY n)
	FROM jsonb_array_elements('[{"user_id": 42, "history": [1001, 1002]}, {"country": "fr"}, {}]') WITH ORDINALITY AS a(x, n)};
my $models = 'SELECT name, version, active, kind, dim, weight_bytes, owner FROM twotower.models ORDER BY 1, 2';
# Serving: a split over the pipeline, a logged list with feedback (the log is data: dumped
# with its owner role, restored in an order its foreign key accepts).
$node->safe_psql('src', q{
	SELECT twotower.save_pipeline('ps', '{"unit": "user_id", "variants": [{"name": "only", "pipeline": "p", "share": 100}]}');
	SELECT count(*) FROM twotower.recommend('ps', '{"user_id": 42, "history": [7, 14]}', request_id => 'dump-1');
	SELECT twotower.feedback('dump-1', item_id) FROM twotower.impressions WHERE request_id = 'dump-1' AND rank = 1;
});
my $log = q{SELECT string_agg(request_id || ':' || logged_by || ':' || variant || ':' || item_id || ':' || rank || ':'
	|| array_to_string(feedback, '+'), ' ' ORDER BY rank) FROM twotower.impressions};
my $changes = q{SELECT string_agg(name || ':' || action, ' ' ORDER BY changed_at, name) FROM twotower.pipeline_changes};
my $dump = $node->basedir . '/src.dump';
$node->command_ok(['pg_dump', '-Fc', '-d', $node->connstr('src'), '-f', $dump], 'pg_dump');
$node->safe_psql('postgres', 'CREATE DATABASE dst');
$node->command_ok(['pg_restore', '-d', $node->connstr('dst'), $dump], 'pg_restore');

is($node->safe_psql('dst', "SELECT pg_get_indexdef('items_idx'::regclass)"),
   $node->safe_psql('src', "SELECT pg_get_indexdef('items_idx'::regclass)"), 'index definition and options restored');
is($node->safe_psql('dst', $cache_triggers), 'pf:A,pf_1:A,pf_2:A', 'the cache triggers restored as they were');
is($node->safe_psql('dst', $models), $node->safe_psql('src', $models), 'model catalogue restored');
is($node->safe_psql('dst', $channels), $node->safe_psql('src', $channels), 'channel catalogue restored');
like($node->safe_psql('src', $i2i), qr/^\d+:1:\d+ /, 'the channel recalls');
is($node->safe_psql('dst', $i2i), $node->safe_psql('src', $i2i), 'the restored channel recalls the same');
is($node->safe_psql('dst', q{SELECT changed_users FROM twotower.refresh_channel('sw')}), '0',
	'the restored channel refreshes (nothing new since its build)');
is($node->safe_psql('dst', $pipelines), $node->safe_psql('src', $pipelines), 'pipelines restored with their owner');
like($node->safe_psql('src', $log), qr/^dump-1:\w+:only:\d+:1:click /, 'the list and its feedback are logged');
is($node->safe_psql('dst', $log), $node->safe_psql('src', $log), 'the impression log and feedback restored');
is($node->safe_psql('dst', $changes), $node->safe_psql('src', $changes), 'the pipelines\' history restored');
is($node->safe_psql('dst', q{SELECT variant FROM twotower.variant_of('ps', '42')}), 'only', 'the restored split assigns');
my ($lrc, $lout, $lerr) = $node->psql('dst', q{SELECT * FROM twotower.recommend('ps', '{"user_id": 42}', request_id => 'dump-1')});
like($lerr, qr/request id "dump-1" is logged already/, 'the restored log keeps its request ids unique');
like($node->safe_psql('src', $recommend), qr/^\d+:1:i2i /, 'the pipeline recommends');
is($node->safe_psql('dst', $recommend), $node->safe_psql('src', $recommend), 'the restored pipeline recommends the same');
like($node->safe_psql('src', $embed), qr/^\{[^ ]+\} \{[^ ]+\} \{[^ ]+\}$/, 'source embeds users');
is($node->safe_psql('dst', $embed), $node->safe_psql('src', $embed), 'restored models give identical user vectors');
is($node->safe_psql('dst', q{SELECT twotower.import_model_file('u', '} . "$g/spec.json', '$g/weights.safetensors')"), '3',
	'version numbering continues after restore');
my @q = map { $_ * 41 } 1 .. 20;
my $op = 'OPERATOR(public.<->)';
my $a = topk_signature($node, 'src', 'items', $op, 10, @q);
my $b = topk_signature($node, 'dst', 'items', $op, 10, @q);
ok(length($a) > 100, 'source answers');
is($b, $a, 'restored database returns the same top-10');
is(index_scan_count($node, 'dst', 'items', $op, 16), $node->safe_psql('src', 'SELECT count(*) FROM items'),
	'restored index covers every row');
# DROP EXTENSION without CASCADE is refused while models exist, in the restored database as in
# the original (a restore does not recreate the owner objects' dependency on the extension).
for my $db ('src', 'dst')
{
	my ($rc, $out, $err) = $node->psql($db, 'DROP EXTENSION pg_twotower');
	isnt($rc, 0, "$db: DROP EXTENSION without CASCADE is refused");
	like($err, qr/cannot drop extension pg_twotower because its catalogue holds \d+ models/, "$db: the refusal names the catalogue");
	is($node->safe_psql($db, 'SELECT count(*) > 0 FROM twotower.model'), 't', "$db: the models are still there");
}
# The guard fails closed: when it cannot find its catalogue (the table renamed here) it refuses a
# plain DROP instead of letting it delete whatever the catalogue holds.
{
	my ($rc, $out, $err) = $node->psql('dst',
		'BEGIN; ALTER TABLE twotower.model_version RENAME TO model_version_moved; DROP EXTENSION pg_twotower; ROLLBACK');
	like($err, qr/cannot drop extension pg_twotower: what its catalogue holds cannot be counted/,
		'dst: a catalogue the guard cannot read refuses a plain DROP EXTENSION');
	is($node->safe_psql('dst', 'SELECT count(*) > 0 FROM twotower.model'), 't', 'dst: the models are still there');
}
# With CASCADE the restored database drops everything, owner objects included.
$node->safe_psql('dst', 'DROP EXTENSION pg_twotower CASCADE');
is($node->safe_psql('dst', q{SELECT count(*) FROM pg_largeobject_metadata
	WHERE obj_description(oid, 'pg_largeobject') LIKE 'pg_twotower%'}), '0', 'no owner object is left behind');

# The impression log's INSERT is planned once per backend: in one session, after DROP
# EXTENSION ... CASCADE and CREATE EXTENSION, the next logged call plans it again.
$node->safe_psql('postgres', 'CREATE DATABASE replan');
my $serving = qq{
	CREATE EXTENSION pg_twotower;
	DO \$\$ BEGIN
		PERFORM twotower.import_model_file('u', '$g/spec.json', '$g/weights.safetensors');
		CREATE TABLE IF NOT EXISTS it8 (id bigint PRIMARY KEY, v real[]);
		IF NOT EXISTS (SELECT 1 FROM it8) THEN
			INSERT INTO it8 SELECT i, ARRAY(SELECT sin(i * j)::real FROM generate_series(1, 8) j) FROM generate_series(1, 100) i;
		END IF;
		CREATE INDEX IF NOT EXISTS it8_idx ON it8 USING twotower_hnsw (v real_cosine_ops);
		PERFORM twotower.save_pipeline('rp', '{"user_model": "u", "vectors": {"table": "it8", "vector_column": "v"},
		  "channels": [{"type": "twotower", "index": "it8_idx", "k": 10}], "k": 3}');
	END \$\$;
	SELECT count(*) FROM twotower.recommend('rp', '{"user_id": 7}', request_id => 'again');
};
is($node->safe_psql('replan', $serving . q{DROP EXTENSION pg_twotower CASCADE;} . $serving
	. q{SELECT count(*) FROM twotower.impression_log}), "3\n3\n1",
	'after DROP and CREATE EXTENSION in one session the log is written again');
$node->stop;
done_testing();
