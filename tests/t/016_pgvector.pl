# pgvector users: twotower_hnsw on pgvector's own `vector` columns (pg_twotower_pgvector), with
# pgvector's operators and operator class names: exact order and recall against exact search
# for each operator class, rows inserted after the build, pgvector's hnsw beside ours on the
# same column, and the SQL surfaces (recall, refresh_item_vectors, recommend) on vector tables.
# Skipped, saying so, where pgvector is not installed (scripts/pgvector.sh installs it).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TwoTower;

my $sharedir = `pg_config --sharedir`;
chomp $sharedir;
if (!-f "$sharedir/extension/vector.control")
{
	plan skip_all => 'pgvector is not installed (scripts/pgvector.sh installs it): the pgvector tests are skipped';
}

my $node = new_node('pgvector');
$node->safe_psql('postgres', 'CREATE EXTENSION vector; CREATE EXTENSION pg_twotower_pgvector');

# 3000 rows of 16-dimensional vectors (deterministic), as a pgvector column.
$node->safe_psql('postgres', q{
	SELECT setseed(0.42);
	CREATE TABLE items (id bigint PRIMARY KEY, v vector(16));
	INSERT INTO items SELECT i, ARRAY(SELECT (random() * 2 - 1)::real FROM generate_series(1, 16) WHERE i > 0)::vector
	  FROM generate_series(1, 3000) i;
});
my @qids = map { $_ * 97 } 1 .. 20;

for my $case (['vector_cosine_ops', '<=>'], ['vector_ip_ops', '<#>'], ['vector_l2_ops', '<->'])
{
	my ($ops, $op) = @$case;
	$node->safe_psql('postgres', "CREATE INDEX items_tt ON items USING twotower_hnsw (v $ops)");
	my $recall = topk_recall($node, 'postgres', 'items', $op, 10, @qids);
	cmp_ok($recall, '>=', 0.95, "$ops: recall\@10 against exact search ($recall)");
	# Distances come back in order (exact order), and equal pgvector's own operator.
	my $unordered = $node->safe_psql('postgres', qq{
		SET enable_seqscan = off;
		WITH r AS (SELECT id, v $op (SELECT v FROM items WHERE id = 5) AS d, row_number() OVER () AS n
		             FROM (SELECT id, v FROM items ORDER BY v $op (SELECT v FROM items WHERE id = 5) LIMIT 200) s)
		SELECT count(*) FROM r a JOIN r b ON b.n = a.n + 1 WHERE b.d < a.d;
	});
	is($unordered, '0', "$ops: 200 rows in distance order");
	# A row inserted after the build is found by its own vector at once.
	$node->safe_psql('postgres', "INSERT INTO items VALUES (9001, array_fill(0.9::real, ARRAY[16])::vector)");
	my $first = $node->safe_psql('postgres', qq{
		SET enable_seqscan = off;
		SELECT id FROM items ORDER BY v $op array_fill(0.9::real, ARRAY[16])::vector LIMIT 1});
	is($first, '9001', "$ops: a row inserted after the build is found");
	$node->safe_psql('postgres', 'DELETE FROM items WHERE id = 9001; DROP INDEX items_tt');
}

# The default operator class is cosine; pgvector's hnsw on the same column works beside ours.
$node->safe_psql('postgres', 'CREATE INDEX items_tt ON items USING twotower_hnsw (v)');
is($node->safe_psql('postgres', q{SELECT c.opcname FROM pg_index i JOIN pg_opclass c ON c.oid = i.indclass[0]
	WHERE i.indexrelid = 'items_tt'::regclass}), 'vector_cosine_ops', 'the default operator class on vector is vector_cosine_ops');
$node->safe_psql('postgres', 'CREATE INDEX items_pgv ON items USING hnsw (v vector_cosine_ops)');
my $ours = topk_signature($node, 'postgres', 'items', '<=>', 10, @qids);
$node->safe_psql('postgres', 'DROP INDEX items_pgv');
is(topk_signature($node, 'postgres', 'items', '<=>', 10, @qids), $ours, 'pgvector\'s index beside ours changes nothing');

# The SQL surfaces on vector tables: a user tower whose vector is the request's "q".
$node->safe_psql('postgres', q{
	CREATE FUNCTION st(h text, d bytea) RETURNS bytea LANGUAGE sql AS $$
	    SELECT set_byte(set_byte('\x0000000000000000'::bytea, 0, length(convert_to(h, 'UTF8')) % 256), 1,
	                    length(convert_to(h, 'UTF8')) / 256) || convert_to(h, 'UTF8') || d $$;
	SELECT twotower.import_model('u', '{"format": "pg_twotower.tower", "spec_version": 1, "kind": "user",
	  "features": [{"name": "q", "type": "dense", "dim": 16}], "layers": [], "output": {"dim": 16, "metric": "cosine"}}', st('{}', ''));
	SELECT twotower.import_model('i', '{"format": "pg_twotower.tower", "spec_version": 1, "kind": "item",
	  "features": [{"name": "x", "type": "dense", "dim": 16}], "layers": [], "output": {"dim": 16, "metric": "cosine"}}', st('{}', ''));
});
my $recall = $node->safe_psql('postgres', q{
	SELECT string_agg(item_id::text, ',' ORDER BY rank) FROM twotower.recall('u', 'items_tt',
	  jsonb_build_object('q', (SELECT v::real[] FROM items WHERE id = 97)), 10, exclude => '{97}')});
my $exact = $node->safe_psql('postgres', q{
	SET enable_indexscan = off; SET enable_bitmapscan = off;
	SELECT string_agg(id::text, ',' ORDER BY d, id) FROM (
	  SELECT id, v <=> (SELECT v FROM items WHERE id = 97) AS d FROM items WHERE id <> 97 ORDER BY d, id LIMIT 10) s});
is($recall, $exact, 'recall over a vector column equals exact search');

$node->safe_psql('postgres', q{
	CREATE TABLE catalog (item_id bigint PRIMARY KEY, x real[]);
	INSERT INTO catalog SELECT id, v::real[] FROM items WHERE id <= 500;
	CREATE TABLE item_vectors (id bigint PRIMARY KEY, embedding vector(16));
	CREATE INDEX item_vectors_idx ON item_vectors USING twotower_hnsw (embedding vector_cosine_ops);
});
is($node->safe_psql('postgres', q{
	SELECT inserted || ' ' || updated FROM twotower.refresh_item_vectors('i', 'catalog', 'item_vectors', id_column => 'item_id')}),
	'500 0', 'refresh_item_vectors writes a vector target');
is($node->safe_psql('postgres', q{
	SELECT inserted || ' ' || updated || ' ' || unchanged FROM twotower.refresh_item_vectors('i', 'catalog', 'item_vectors', id_column => 'item_id')}),
	'0 0 500', 'a second refresh leaves unchanged vectors alone');
$node->safe_psql('postgres', q{
	SELECT twotower.save_pipeline('home', '{"user_model": "u", "vectors": {"table": "item_vectors"},
	  "channels": [{"type": "twotower", "index": "item_vectors_idx", "k": 50}],
	  "stages": [{"type": "twotower", "keep": 20}], "k": 10}');
});
my $rec = $node->safe_psql('postgres', q{
	SELECT string_agg(item_id::text, ',' ORDER BY rank) FROM twotower.recommend('home',
	  jsonb_build_object('q', (SELECT v::real[] FROM items WHERE id = 7)))});
my $rec_exact = $node->safe_psql('postgres', q{
	SET enable_indexscan = off; SET enable_bitmapscan = off;
	SELECT string_agg(id::text, ',' ORDER BY d, id) FROM (
	  SELECT id, embedding <=> (SELECT v FROM items WHERE id = 7) AS d FROM item_vectors ORDER BY d, id LIMIT 10) s});
is($rec, $rec_exact, 'recommend over a vector table equals exact search');

$node->stop;
done_testing();
