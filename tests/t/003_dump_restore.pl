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
	CREATE INDEX items_idx ON items USING twotower_hnsw (v twotower.real_l2_ops) WITH (m = 12, ef_construction = 80, quantization = 'f16');
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
my $embed = q{SELECT string_agg(twotower.embed_user('u', x)::text, ' ' ORDER BY n)
	FROM jsonb_array_elements('[{"user_id": 42, "history": [1001, 1002]}, {"country": "fr"}, {}]') WITH ORDINALITY AS a(x, n)};
my $models = 'SELECT name, version, active, kind, dim, weight_bytes, owner FROM twotower.models ORDER BY 1, 2';
my $dump = $node->basedir . '/src.dump';
$node->command_ok(['pg_dump', '-Fc', '-d', $node->connstr('src'), '-f', $dump], 'pg_dump');
$node->safe_psql('postgres', 'CREATE DATABASE dst');
$node->command_ok(['pg_restore', '-d', $node->connstr('dst'), $dump], 'pg_restore');

is($node->safe_psql('dst', "SELECT pg_get_indexdef('items_idx'::regclass)"),
   $node->safe_psql('src', "SELECT pg_get_indexdef('items_idx'::regclass)"), 'index definition and options restored');
is($node->safe_psql('dst', $models), $node->safe_psql('src', $models), 'model catalogue restored');
like($node->safe_psql('src', $embed), qr/^\{[^ ]+\} \{[^ ]+\} \{[^ ]+\}$/, 'source embeds users');
is($node->safe_psql('dst', $embed), $node->safe_psql('src', $embed), 'restored models give identical user vectors');
is($node->safe_psql('dst', q{SELECT twotower.import_model_file('u', '} . "$g/spec.json', '$g/weights.safetensors')"), '3',
	'version numbering continues after restore');
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
