# The delta graph (rows inserted after the build, folded by inserts and VACUUM): a streaming
# replica answers the same after folds and after VACUUM rebuilt the delta graph without dead
# rows; a kill -9 in the middle of a fold loses nothing committed; folds reuse the pages they
# free.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TwoTower;

# (No checkpoint in the middle of scenario 5's measurement: the first change of a page after one
# is logged whole. The primary keeps 1 GB of WAL: the end-of-recovery checkpoint after the
# crash of scenario 3 would otherwise remove segments a replica slowed by a loaded machine has
# not received yet, and it could never catch up.)
my $node = new_node('fold', init => { allows_streaming => 1 },
	conf => ["search_path = 'public, twotower'", 'twotower.ef_search = 200',
		"checkpoint_timeout = '1h'", "max_wal_size = '4GB'", "wal_keep_size = '1GB'"]);
$node->backup('b0');
my $replica = PostgreSQL::Test::Cluster->new('fold_replica');
$replica->init_from_backup($node, 'b0', has_streaming => 1);
$replica->append_conf('postgresql.conf', "search_path = 'public, twotower'\ntwotower.ef_search = 200");
$replica->start;

my $dims = 16;
my $op = 'OPERATOR(public.<->)';
make_items($node, 'postgres', 'items', 2000, $dims);
$node->safe_psql('postgres', q{
	ALTER TABLE items SET (autovacuum_enabled = off);
	CREATE INDEX items_idx ON items USING twotower_hnsw (v real_l2_ops) WITH (fold_threshold = 100);
	CREATE PROCEDURE insert_many(n int) LANGUAGE plpgsql AS $$
	BEGIN
		FOR i IN 1 .. n LOOP
			INSERT INTO items (category, v)
			SELECT i % 10, ARRAY(SELECT (random() * 2 - 1)::real FROM generate_series(1, 16) WHERE i > 0);
			COMMIT;
		END LOOP;
	END $$;
});
# Index blocks one top-10 scan reads (the delta pages of unfolded rows would be many); works
# on a standby too (no temporary table).
sub blocks_per_scan
{
	my ($n) = @_;
	return $n->safe_psql('postgres', qq{
		BEGIN;
		SET LOCAL enable_seqscan = off;
		SELECT pg_stat_get_xact_blocks_fetched('items_idx'::regclass) AS b0 \\gset
		SELECT count(*) FROM (SELECT id FROM items ORDER BY v <-> array_fill(0.1::real, ARRAY[$dims]) LIMIT 10) s \\g /dev/null
		SELECT pg_stat_get_xact_blocks_fetched('items_idx'::regclass) - :b0;
		COMMIT;});
}

# 1. 6000 rows inserted one transaction at a time: folded many times on the way.
$node->safe_psql('postgres', 'CALL insert_many(6000)');
my $rows = $node->safe_psql('postgres', 'SELECT count(*) FROM items');
is($node->safe_psql('postgres', "SELECT graph_items + delta_items FROM index_info('items_idx')"), $rows,
	'every row is in the main graph or the delta');
cmp_ok(blocks_per_scan($node), '<', 30, 'a scan reads a few index blocks, not the delta pages of 6000 rows');
is(index_scan_count($node, 'postgres', 'items', '<->', $dims), $rows, 'the index reaches every row once');
my @q = (1, 1999, 2001, 5000, 7999);
cmp_ok(topk_recall($node, 'postgres', 'items', $op, 10, @q), '>=', 0.9, 'the index agrees with exact search');
$node->wait_for_catchup($replica);
is(topk_signature($replica, 'postgres', 'items', $op, 10, @q), topk_signature($node, 'postgres', 'items', $op, 10, @q),
	'the replica answers the same after the folds');
cmp_ok(blocks_per_scan($replica), '<', 30, 'the replica reads the delta graph too (replayed, not re-folded)');

# 2. Deletes and VACUUM: the delta graph is rebuilt without the dead rows before the heap reuses
# their slots; new rows in those slots are found with their own vectors, on both nodes.
$node->safe_psql('postgres', q{
	DELETE FROM items WHERE id > 2000 AND id % 2 = 0;
	VACUUM items;
	INSERT INTO items (category, v)
	SELECT 7, ARRAY(SELECT (random() * 2 - 1)::real FROM generate_series(1, 16) WHERE i > 0)
	  FROM generate_series(1, 500) i;
});
$rows = $node->safe_psql('postgres', 'SELECT count(*) FROM items');
is(index_scan_count($node, 'postgres', 'items', '<->', $dims), $rows, 'after VACUUM the index reaches exactly the live rows');
is($node->safe_psql('postgres', q{
	SET enable_seqscan = off;
	SELECT count(*) FROM items i WHERE i.category = 7
	   AND (SELECT t.id FROM items t ORDER BY t.v <-> i.v LIMIT 1) <> i.id}), '0',
	'rows in reused heap slots are found with their own vectors');
@q = (3, 2001, 7001, $node->safe_psql('postgres', 'SELECT max(id) FROM items'));
cmp_ok(topk_recall($node, 'postgres', 'items', $op, 10, @q), '>=', 0.9, 'after VACUUM the index agrees with exact search');
$node->wait_for_catchup($replica);
is(topk_signature($replica, 'postgres', 'items', $op, 10, @q), topk_signature($node, 'postgres', 'items', $op, 10, @q),
	'the replica answers the same after VACUUM rebuilt the delta graph');

# 3. kill -9 while inserts fold (a fold of a few thousand rows takes a while: it lands in one).
my $size0 = $node->safe_psql('postgres', "SELECT size_bytes FROM index_info('items_idx')");
my $bg = $node->background_psql('postgres', on_error_stop => 0);
$bg->query_until(qr/started/, "\\echo started\nCALL insert_many(1000000);\n");
my $before = $rows;
ok($node->poll_query_until('postgres', "SELECT count(*) > $before + 3000 FROM items"), 'inserts are running');
# The last count seen committed before the kill: recovery must keep at least these rows.
my $seen = $node->safe_psql('postgres', 'SELECT count(*) FROM items');
kill_mid_statement($node, $bg, 'the inserts');
$node->start;
$rows = $node->safe_psql('postgres', 'SELECT count(*) FROM items');
cmp_ok($rows, '>=', $seen, "every insert seen committed before the crash survived it ($seen rows seen, $rows after recovery)");
is(index_scan_count($node, 'postgres', 'items', '<->', $dims), $rows, 'every committed row is in the index after recovery');
# (INDEX_CLEANUP ON: a VACUUM that finds only the in-flight row dead would otherwise skip the
# indexes, leaving its entry until a later VACUUM; its heap slot is not reused meanwhile.)
$node->safe_psql('postgres', 'VACUUM (INDEX_CLEANUP ON) items');
is($node->safe_psql('postgres', "SELECT graph_items - graph_dead + delta_items FROM index_info('items_idx')"), $rows,
	'after VACUUM the index holds exactly the committed rows');
@q = (5, 2001, $rows - 10, $node->safe_psql('postgres', 'SELECT max(id) FROM items'));
cmp_ok(topk_recall($node, 'postgres', 'items', $op, 10, @q), '>=', 0.9, 'after recovery the index agrees with exact search');
$node->safe_psql('postgres', 'CALL insert_many(2000)');
is(index_scan_count($node, 'postgres', 'items', '<->', $dims), $rows + 2000, 'inserts and folds go on after recovery');
$node->wait_for_catchup($replica);
is(topk_signature($replica, 'postgres', 'items', $op, 10, @q), topk_signature($node, 'postgres', 'items', $op, 10, @q),
	'the replica answers the same after the crash and recovery');

# 4. Folds reuse the pages they free: five rounds of insert, delete, VACUUM leave the size flat.
$node->safe_psql('postgres', 'DELETE FROM items WHERE id > 2000; VACUUM items');
$size0 = $node->safe_psql('postgres', "SELECT size_bytes FROM index_info('items_idx')");
for my $round (1 .. 5)
{
	$node->safe_psql('postgres', 'CALL insert_many(3000)');
	$node->safe_psql('postgres', 'DELETE FROM items WHERE id > 2000; VACUUM items');
}
my $size = $node->safe_psql('postgres', "SELECT size_bytes FROM index_info('items_idx')");
cmp_ok($size, '<=', $size0 * 1.2, "the index stays the same size over rounds of inserts and deletes ($size0 -> $size bytes)");
is(index_scan_count($node, 'postgres', 'items', '<->', $dims), '2000', 'and reaches exactly the live rows');

# 5. A fold logs what changed, not the delta graph: it writes the new graph over the pages of
# the graph before the current one, section by section, so WAL carries the appended items and
# the changed neighbour lists. Before, every fold wrote the whole delta graph (with 64
# dimensions, about 1.7 times its vectors' bytes per fold here).
$node->safe_psql('postgres', q{
	CREATE TABLE w (id bigserial, v real[]) WITH (autovacuum_enabled = off);
	INSERT INTO w (v) SELECT ARRAY(SELECT (random() * 2 - 1)::real FROM generate_series(1, 64) WHERE g > 0)
	  FROM generate_series(1, 1000) g;
	CREATE INDEX w_idx ON w USING twotower_hnsw (v real_l2_ops) WITH (fold_threshold = 100);
	CREATE PROCEDURE insert_w(n int) LANGUAGE plpgsql AS $$
	BEGIN
		FOR i IN 1 .. n LOOP
			INSERT INTO w (v) SELECT ARRAY(SELECT (random() * 2 - 1)::real FROM generate_series(1, 64) WHERE i > 0);
			COMMIT;
		END LOOP;
	END $$;
	CALL insert_w(4000);
});
my ($lsn0, $folds0, $graph0) = split /\|/, $node->safe_psql('postgres',
	"SELECT pg_current_wal_lsn(), folds, delta_graph_items FROM index_info('w_idx')");
$node->safe_psql('postgres', 'CALL insert_w(600)');
my ($wal, $folds1) = split /\|/, $node->safe_psql('postgres',
	"SELECT pg_current_wal_lsn() - '$lsn0'::pg_lsn, folds FROM index_info('w_idx')");
my $vector_bytes = $graph0 * 64 * 4;
cmp_ok($folds1 - $folds0, '>=', 3, "the 600 rows folded into the delta graph ($graph0 items) several times");
cmp_ok($wal / ($folds1 - $folds0), '<', 0.5 * $vector_bytes,
	sprintf('a fold logs far less than the delta graph (%.0f bytes of WAL a fold, rows included; the graph\'s vectors alone: %d bytes)',
		$wal / ($folds1 - $folds0), $vector_bytes));
is(index_scan_count($node, 'postgres', 'w', '<->', 64), $node->safe_psql('postgres', 'SELECT count(*) FROM w'),
	'the index reaches every row after the folds');
cmp_ok(topk_recall($node, 'postgres', 'w', $op, 10, 1, 2500, 5500), '>=', 0.9, 'and agrees with exact search');
$node->wait_for_catchup($replica);
is(topk_signature($replica, 'postgres', 'w', $op, 10, 1, 2500, 5500), topk_signature($node, 'postgres', 'w', $op, 10, 1, 2500, 5500),
	'the replica answers the same (it replayed the differences)');

my $log = slurp_file($node->logfile);
unlike($log, qr/PANIC|TRAP|terminated by signal 11|terminated by signal 6/, 'no backend crashed');
$node->stop;
$replica->stop;
done_testing();
