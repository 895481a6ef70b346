# The scenarios pgvector's HNSW TAP tests check, for twotower_hnsw: repeated delete / VACUUM /
# insert cycles with a replica (its 010), the last survivor after deleting everything else
# (011), recall per operator class with the plan (012), duplicates (015), near-limit dimensions
# with idx_scan (016), the planner's choice for selective filters (017/039), filtered recall
# (043/044), distances against an independent reference (034), and concurrent SELECT with
# VACUUM on a fully deleted table (046).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use List::Util qw(sum);
use TwoTower;

my $node = new_node('pgv', init => { allows_streaming => 1 }, conf => ["search_path = 'public, twotower'"]);
$node->backup('b0');
my $replica = PostgreSQL::Test::Cluster->new('pgv_replica');
$replica->init_from_backup($node, 'b0', has_streaming => 1);
$replica->start;

my $dims = 8;
make_items($node, 'postgres', 'items', 3000, $dims);
$node->safe_psql('postgres', q{
	ALTER TABLE items SET (autovacuum_enabled = off);
	CREATE INDEX items_idx ON items USING twotower_hnsw (v real_l2_ops);
});
my @q = (1, 333, 1234, 2999);
my $op = 'OPERATOR(public.<->)';

# 010: delete / VACUUM / insert cycles; every cycle the index covers exactly the live rows,
# agrees with exact search, and the replica answers the same.
for my $cycle (1 .. 3)
{
	$node->safe_psql('postgres', qq{
		DELETE FROM items WHERE id % 3 = $cycle % 3;
		VACUUM items;
		INSERT INTO items (category, v)
		SELECT i % 10, ARRAY(SELECT (random() * 2 - 1)::real FROM generate_series(1, $dims) WHERE i > 0)
		  FROM generate_series(1, 1000) i;
	});
	my @live = split /\n/, $node->safe_psql('postgres', 'SELECT id FROM items ORDER BY id LIMIT 4');
	is(index_scan_count($node, 'postgres', 'items', '<->', $dims),
		$node->safe_psql('postgres', 'SELECT count(*) FROM items'), "cycle $cycle: the index covers the live rows");
	cmp_ok(topk_recall($node, 'postgres', 'items', $op, 10, @live), '>=', 0.9, "cycle $cycle: recall against exact search");
	$node->wait_for_catchup($replica);
	is(topk_signature($replica, 'postgres', 'items', $op, 10, @live),
		topk_signature($node, 'postgres', 'items', $op, 10, @live), "cycle $cycle: the replica answers the same");
}

# 011: everything but one row deleted and vacuumed: the survivor is still found.
$node->safe_psql('postgres', q{
	DELETE FROM items WHERE id <> (SELECT max(id) FROM items);
	VACUUM items;
});
my $survivor = $node->safe_psql('postgres', 'SELECT id FROM items');
is($node->safe_psql('postgres', qq{
	SET enable_seqscan = off;
	SELECT id FROM items ORDER BY v <-> array_fill(0::real, ARRAY[$dims]) LIMIT 5}), $survivor,
	'the last survivor of a deleted table is found');
is($node->safe_psql('postgres', "SELECT graph_items - graph_dead + delta_items FROM twotower.index_info('items_idx')"),
	'1', 'and it is the only entry left');

# 012: build recall per operator class, with the plan asserted.
$node->safe_psql('postgres', 'DROP TABLE items');
make_items($node, 'postgres', 'items', 5000, 16);
for my $c (['real_l2_ops', '<->'], ['real_ip_ops', '<#>'], ['real_cosine_ops', '<=>'])
{
	my ($ops, $o) = @$c;
	$node->safe_psql('postgres', "CREATE INDEX items_idx ON items USING twotower_hnsw (v $ops)");
	cmp_ok(topk_recall($node, 'postgres', 'items', "OPERATOR(public.$o)", 10, map { $_ * 97 } 1 .. 30),
		'>=', 0.95, "$ops: recall\@10 against exact search");
	$node->safe_psql('postgres', 'DROP INDEX items_idx');
}

# 043/044: filtered queries (10% of the rows) keep recall, in strict order.
$node->safe_psql('postgres', 'CREATE INDEX items_idx ON items USING twotower_hnsw (v)');
my ($hit, $all) = (0, 0);
for my $qid (map { $_ * 131 } 1 .. 20)
{
	my $sql = "SELECT id FROM items WHERE category = 3 ORDER BY v <=> (SELECT v FROM items WHERE id = $qid) LIMIT 10";
	my @got = split /\n/, $node->safe_psql('postgres', "SET enable_seqscan = off; $sql");
	my %exact = map { $_ => 1 } split /\n/, $node->safe_psql('postgres', "SET enable_indexscan = off; $sql");
	$all += scalar keys %exact;
	$hit += grep { $exact{$_} } @got;
}
cmp_ok($hit / $all, '>=', 0.9, sprintf('filtered recall@10 %.3f', $hit / $all));

# 017/039: a selective filter on another index wins; ORDER BY ... LIMIT uses ours.
$node->safe_psql('postgres', 'CREATE INDEX items_category ON items (category); ANALYZE items');
unlike($node->safe_psql('postgres', q{EXPLAIN (COSTS OFF)
	SELECT id FROM items WHERE id = 42 ORDER BY v <=> array_fill(0.5::real, ARRAY[16]) LIMIT 10}),
	qr/items_idx/, 'a primary-key lookup does not use the vector index');
like($node->safe_psql('postgres', q{EXPLAIN (COSTS OFF)
	SELECT id FROM items ORDER BY v <=> array_fill(0.5::real, ARRAY[16]) LIMIT 10}),
	qr/Index Scan using items_idx/, 'ORDER BY ... LIMIT uses the vector index without hints');

# 015: duplicates. 500 copies of one vector: all are returned, nearest first, none twice.
$node->safe_psql('postgres', q{
	INSERT INTO items (category, v) SELECT 99, array_fill(0.25::real, ARRAY[16]) FROM generate_series(1, 500);
	REINDEX INDEX items_idx;
	INSERT INTO items (category, v) SELECT 99, array_fill(0.25::real, ARRAY[16]) FROM generate_series(1, 50);
});
is($node->safe_psql('postgres', q{
	SET enable_seqscan = off; SET twotower.iterative_scan = relaxed_order;
	SELECT count(*) || ' ' || count(DISTINCT id) FROM (SELECT id FROM items
	 ORDER BY v <-> array_fill(0.25::real, ARRAY[16]) LIMIT 550) s}), '550 550',
	'550 duplicates (graph and delta) come back once each');
is($node->safe_psql('postgres', q{
	SET enable_seqscan = off;
	SELECT count(*) FROM (SELECT id, category FROM items
	 ORDER BY v <-> array_fill(0.25::real, ARRAY[16]) LIMIT 550) s WHERE category = 99}), '550',
	'and they are the nearest rows');

# 016: near the dimension limit (2000: one vector per page), with idx_scan counted.
$node->safe_psql('postgres', q{
	CREATE TABLE wide (id int PRIMARY KEY, v real[]);
	INSERT INTO wide SELECT i, ARRAY(SELECT (random() * 2 - 1)::real FROM generate_series(1, 2000) WHERE i > 0)
	  FROM generate_series(1, 300) i;
	CREATE INDEX wide_idx ON wide USING twotower_hnsw (v);
	INSERT INTO wide SELECT 300 + i, ARRAY(SELECT (random() * 2 - 1)::real FROM generate_series(1, 2000) WHERE i > 0)
	  FROM generate_series(1, 20) i;
});
is($node->safe_psql('postgres', q{
	SET enable_seqscan = off;
	SELECT string_agg(x::text, ',') FROM (
	  SELECT (SELECT id FROM wide ORDER BY v <=> w.v LIMIT 1) = w.id AS x FROM wide w WHERE w.id IN (1, 150, 310)) s}),
	'true,true,true', '2000-dimension rows (graph and delta) are their own nearest neighbours');
$node->safe_psql('postgres', 'SELECT pg_stat_force_next_flush()');
cmp_ok($node->safe_psql('postgres', q{SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'wide_idx'}),
	'>=', 3, 'and the scans are counted in pg_stat_user_indexes');
is($node->safe_psql('postgres', q{SELECT count(*) FROM wide WHERE twotower.vector_dims(v) = 2000}), '320', 'all rows kept');
my ($rc, $out, $err) = $node->psql('postgres', q{INSERT INTO wide VALUES (999, array_fill(1::real, ARRAY[2001]))});
like($err, qr/2000/, 'one more dimension than the limit is refused with the limit named');

# 034: the distance functions against an independent reference (Perl, double precision).
srand(7);
my $worst = 0;
for my $t (1 .. 50)
{
	my $n = 1 + int(rand(300));
	my @a = map { (rand() * 2 - 1) * 10**(int(rand(7)) - 3) } 1 .. $n;
	my @b = map { (rand() * 2 - 1) * 10**(int(rand(7)) - 3) } 1 .. $n;
	# The arguments are real[]: compare against the values PostgreSQL stores.
	my $la = 'ARRAY[' . join(',', map { sprintf('%.9e', $_) } @a) . ']::real[]';
	my $lb = 'ARRAY[' . join(',', map { sprintf('%.9e', $_) } @b) . ']::real[]';
	# (as doubles printed exactly: a real widened to double precision is exact)
	my ($fa, $fb) = map {
		[split /,/, $node->safe_psql('postgres', "SET extra_float_digits = 3; SELECT array_to_string(($_)::float8[], ',')")]
	} ($la, $lb);
	my $dot = sum(map { $fa->[$_] * $fb->[$_] } 0 .. $n - 1);
	my $na = sqrt(sum(map { $_ * $_ } @$fa));
	my $nb = sqrt(sum(map { $_ * $_ } @$fb));
	my $l2 = sqrt(sum(map { ($fa->[$_] - $fb->[$_])**2 } 0 .. $n - 1));
	my ($c, $i, $e) = split /\|/, $node->safe_psql('postgres',
		"SET extra_float_digits = 3; SELECT $la <=> $lb, $la <#> $lb, $la <-> $lb");
	for my $pair ([$c, 1 - $dot / ($na * $nb), 2], [$i, -$dot, abs($dot) + $na * $nb], [$e, $l2, $l2 + 1e-300])
	{
		my ($got, $want, $scale) = @$pair;
		my $rel = abs($got - $want) / $scale;
		$worst = $rel if $rel > $worst;
	}
}
cmp_ok($worst, '<', 1e-9, "operators agree with an independent double-precision reference (worst relative error $worst)");

# 046: SELECTs while a fully deleted table is vacuumed: no errors, then no rows.
$node->safe_psql('postgres', q{DELETE FROM items; ALTER TABLE items SET (autovacuum_enabled = off)});
my $dir = PostgreSQL::Test::Utils::tempdir;
open(my $fh, '>', "$dir/q.sql") or die;
print $fh "SET enable_seqscan = off;\nSELECT id FROM items ORDER BY v <=> array_fill(0.5::real, ARRAY[16]) LIMIT 10;\n";
close $fh;
my ($o, $e2) = ('', '');
my $h = IPC::Run::start([ 'pgbench', '-n', '-c', '4', '-j', '2', '-T', '5', '-f', "$dir/q.sql",
	'-h', $node->host, '-p', $node->port, 'postgres' ], '>', \$o, '2>', \$e2);
$node->safe_psql('postgres', 'VACUUM items') for 1 .. 3;
ok($h->finish, 'concurrent SELECTs during VACUUM of a fully deleted table succeed') or diag($e2);
like($o, qr/number of failed transactions: 0/, 'no failed queries');
is($node->safe_psql('postgres', q{SET enable_seqscan = off;
	SELECT count(*) FROM (SELECT id FROM items ORDER BY v <=> array_fill(0.5::real, ARRAY[16]) LIMIT 10) s}), '0',
	'the vacuumed empty table returns nothing');

$replica->stop;
$node->stop;
done_testing();
