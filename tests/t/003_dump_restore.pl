# pg_dump / pg_restore reproduce the index and its results.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TwoTower;

my $node = PostgreSQL::Test::Cluster->new('dump');
$node->init;
$node->append_conf('postgresql.conf', "maintenance_work_mem = '512MB'\ntwotower.ef_search = 400");
$node->start;
$node->safe_psql('postgres', 'CREATE DATABASE src');
$node->safe_psql('src', 'CREATE EXTENSION pg_twotower');
make_items($node, 'src', 'items', 5000, 16);
$node->safe_psql('src', q{
	CREATE INDEX items_idx ON items USING twotower_hnsw (v twotower.real_l2_ops) WITH (m = 12, ef_construction = 80, quantization = 'f16');
	INSERT INTO items (category, v) SELECT 2, array_fill(3::real, ARRAY[16]);
	DELETE FROM items WHERE id % 11 = 0;
});
my $dump = $node->basedir . '/src.dump';
$node->command_ok(['pg_dump', '-Fc', '-d', $node->connstr('src'), '-f', $dump], 'pg_dump');
$node->safe_psql('postgres', 'CREATE DATABASE dst');
$node->command_ok(['pg_restore', '-d', $node->connstr('dst'), $dump], 'pg_restore');

is($node->safe_psql('dst', "SELECT pg_get_indexdef('items_idx'::regclass)"),
   $node->safe_psql('src', "SELECT pg_get_indexdef('items_idx'::regclass)"), 'index definition and options restored');
my @q = map { $_ * 41 } 1 .. 20;
my $op = 'OPERATOR(twotower.<->)';
my $a = topk_signature($node, 'src', 'items', $op, 10, @q);
my $b = topk_signature($node, 'dst', 'items', $op, 10, @q);
ok(length($a) > 100, 'source answers');
is($b, $a, 'restored database returns the same top-10');
is(index_scan_count($node, 'dst', 'items', $op, 16), $node->safe_psql('src', 'SELECT count(*) FROM items'),
	'restored index covers every row');
$node->stop;
done_testing();
