# A graph entry whose heap TID was vacuumed never matches the new row that reuses the TID.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TwoTower;

my $node = new_node('reuse');
$node->safe_psql('postgres', q{
	CREATE TABLE t (id int, v real[]) WITH (autovacuum_enabled = off);
	INSERT INTO t SELECT i, ARRAY[i, 0, 0, 0]::real[] FROM generate_series(1, 300) i;
	CREATE INDEX t_idx ON t USING twotower_hnsw (v real_l2_ops);
	CREATE TABLE old_tids AS SELECT ctid::text AS tid, id, v FROM t;
});
# Delete all but the first row and vacuum: the deleted rows' TIDs become free. (One row stays
# live: a graph with nothing live is retired by VACUUM, 017's scenario 011, and its entries
# would no longer be there to be matched.)
$node->safe_psql('postgres', 'DELETE FROM t WHERE id > 1');
$node->safe_psql('postgres', 'VACUUM t');
is($node->safe_psql('postgres', "SELECT graph_items, graph_dead FROM twotower.index_info('t_idx')"), '300|299',
	'vacuum tombstoned every deleted graph entry');

# New rows far away reuse the same TIDs.
$node->safe_psql('postgres', q{INSERT INTO t SELECT 1000 + i, ARRAY[1000 + i, 5, 5, 5]::real[] FROM generate_series(1, 300) i});
ok($node->safe_psql('postgres', 'SELECT count(*) FROM t JOIN old_tids o ON o.tid = t.ctid::text') > 250, 'TIDs were reused');

# Query with an old vector: the old graph entries point at reused TIDs and must not match.
my $q = "ARRAY[10, 0, 0, 0]::real[]";
my $idx = $node->safe_psql('postgres', qq{SET enable_seqscan = off;
	SELECT string_agg(id::text, ',') FROM (SELECT id FROM t ORDER BY v OPERATOR(public.<->) $q LIMIT 5) s});
my $exact = $node->safe_psql('postgres', qq{SET enable_indexscan = off;
	SELECT string_agg(id::text, ',') FROM (SELECT id FROM t ORDER BY v OPERATOR(public.<->) $q LIMIT 5) s});
is($idx, $exact, 'index scan returns the true nearest rows, not rows behind reused TIDs');
is($idx, '1,1001,1002,1003,1004', 'nearest rows are the live old one and the new ones, in distance order');
is($node->safe_psql('postgres', qq{SET enable_seqscan = off;
	SET twotower.iterative_scan = relaxed_order;
	SELECT count(*), count(DISTINCT id) FROM (SELECT id FROM t ORDER BY v OPERATOR(public.<->) $q LIMIT 100000) s}),
	'301|301', 'every live row exactly once');

# After REINDEX the tombstones are gone with the old graph.
$node->safe_psql('postgres', 'REINDEX INDEX t_idx');
is($node->safe_psql('postgres', "SELECT graph_items, graph_dead, delta_items FROM twotower.index_info('t_idx')"), '301|0|0', 'REINDEX rebuilt a clean graph');
$node->stop;
done_testing();
