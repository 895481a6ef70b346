# kill -9 of the postmaster during an index build and during inserts loses nothing committed.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TwoTower;

# wal_level = replica (allows_streaming): the build's WAL is written and replayed.
my $node = new_node('crash', init => { allows_streaming => 1 },
	conf => ["maintenance_work_mem = '1GB'", "shared_buffers = '256MB'", "search_path = 'public, twotower'",
		'twotower.ef_search = 400'    # uniform random 32-d data: compare with exact search at high recall
	]);
make_items($node, 'postgres', 'items', 150000, 32);

# 1. Crash in the middle of CREATE INDEX (single worker thread so the build takes a while).
my $bg = $node->background_psql('postgres', on_error_stop => 0);
$bg->query_until(qr/started/, "\\echo started\nSET twotower.build_threads = 1;\nCREATE INDEX items_idx ON items USING twotower_hnsw (v real_l2_ops);\n");
ok($node->poll_query_until('postgres',
	"SELECT count(*) > 0 FROM pg_stat_progress_create_index WHERE phase LIKE '%HNSW%'"),
	'build reached the graph phase');
kill_mid_statement($node, $bg, 'the build');
$node->start;
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_class WHERE relname = 'items_idx'"), '0',
	'the interrupted build left no index');
is($node->safe_psql('postgres', 'SELECT count(*) FROM items'), '150000', 'table intact after crash during build');

# The build works after recovery.
$node->safe_psql('postgres', 'CREATE INDEX items_idx ON items USING twotower_hnsw (v real_l2_ops)');
is(index_scan_count($node, 'postgres', 'items', '<->', 32), '150000', 'index scan reaches every row');
cmp_ok(topk_recall($node, 'postgres', 'items', 'OPERATOR(public.<->)', 10, 1, 500, 9000, 77777, 149999), '>=', 0.9,
	'the rebuilt index agrees with exact search');

# 2. Crash while single-row inserts commit one after another.
$node->safe_psql('postgres', q{
	CREATE PROCEDURE insert_many(n int) LANGUAGE plpgsql AS $$
	BEGIN
		FOR i IN 1 .. n LOOP
			INSERT INTO items (category, v) SELECT 1, ARRAY(SELECT (random() * 2 - 1)::real FROM generate_series(1, 32));
			COMMIT;
		END LOOP;
	END $$;
});
my $script = "\\echo started\nCALL insert_many(1000000);\n";
$bg = $node->background_psql('postgres', on_error_stop => 0);
$bg->query_until(qr/started/, $script);
ok($node->poll_query_until('postgres', 'SELECT count(*) > 150300 FROM items'), 'inserts are running');
# The last count seen committed before the kill: recovery must keep at least these rows.
my $seen = $node->safe_psql('postgres', 'SELECT count(*) FROM items');
kill_mid_statement($node, $bg, 'the inserts');
$node->start;

my $rows = $node->safe_psql('postgres', 'SELECT count(*) FROM items');
my $new = $rows - 150000;
cmp_ok($rows, '>=', $seen, "every insert seen committed before the crash survived it ($seen rows seen, $rows after recovery)");
is(index_scan_count($node, 'postgres', 'items', '<->', 32), $rows, 'every committed row is in the index after recovery');
cmp_ok(topk_recall($node, 'postgres', 'items', 'OPERATOR(public.<->)', 10, 1, 500, 150001, $rows - 1), '>=', 0.9,
	'after recovery the index agrees with exact search');
# The insert in flight at the kill may have left its (uncommitted) entry, possibly folded into
# the delta graph already; VACUUM removes it, and then the delta holds exactly the committed rows.
cmp_ok($node->safe_psql('postgres', "SELECT delta_items FROM twotower.index_info('items_idx')") - $new, '<=', 1,
	'the delta holds the committed inserts (and at most the one in flight)');
# (INDEX_CLEANUP ON: a VACUUM that finds this one dead row would otherwise skip the indexes.)
$node->safe_psql('postgres', 'VACUUM (INDEX_CLEANUP ON) items');
is($node->safe_psql('postgres', "SELECT delta_items FROM twotower.index_info('items_idx')"), $new,
	'after VACUUM the delta holds exactly the committed inserts');
is($node->safe_psql('postgres', q{
	SET enable_seqscan = off;
	SELECT count(*) FROM items i WHERE i.id > 150000 AND i.id % 97 = 0
	   AND (SELECT t.id FROM items t ORDER BY t.v <-> i.v LIMIT 1) = i.id}),
	$node->safe_psql('postgres', 'SELECT count(*) FROM items WHERE id > 150000 AND id % 97 = 0'),
	'rows inserted before the crash (every 97th checked) are their own nearest neighbours');

# The index keeps working for new writes after recovery.
$node->safe_psql('postgres', "INSERT INTO items (category, v) VALUES (1, array_fill(7::real, ARRAY[32]))");
is($node->safe_psql('postgres', q{SET enable_seqscan = off;
	SELECT category FROM items ORDER BY v <-> array_fill(7::real, ARRAY[32]) LIMIT 1}), '1', 'insert after recovery is found');

$node->stop;
done_testing();
