# Citus: a coordinator and two workers (Citus loaded through shared_preload_libraries, the
# workers added by their Unix socket directory), an item table distributed over four shards with
# a twotower_hnsw index propagated to every shard. The plain SQL path `ORDER BY embedding <=> q
# LIMIT k` on the coordinator equals the exact top k of the same rows in a plain table (index
# scans off) for k 10 and for k larger than a shard, with each task an ordered scan of its
# shard's index; exclusions and filters reach the shards; a row written on the coordinator is
# found at once; a worker that is down is an error naming it; twotower.ef_search reaches the
# shards the ways Citus propagates settings; a role without SELECT on the distributed table gets
# 42501. Of the extension's functions, what works on Citus today is checked here (index_info and
# recall() on a worker's own shard index; recall(), recommend() and index_info() on the
# coordinator over the distributed table; index options, folds and REINDEX CONCURRENTLY on the
# shards; build_channel, i2i_recall and train over distributed interactions;
# refresh_item_vectors into a distributed vector table); docs/scale-out.md says what does not
# work yet.
# Skipped, saying so, where Citus is not installed (scripts/citus.sh installs it).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $libdir = `pg_config --pkglibdir`;
my $sharedir = `pg_config --sharedir`;
chomp($libdir, $sharedir);
if (!-f "$libdir/citus.so" || !-f "$sharedir/extension/citus.control")
{
	plan skip_all => 'Citus is not installed (scripts/citus.sh installs it, from TT_CITUS_TARBALL where '
	  . 'no package exists): the Citus tests are skipped';
}

# A node with Citus preloaded, and citus then pg_twotower created in postgres.
sub citus_node
{
	my ($name) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
	$node->append_conf('postgresql.conf', join("\n",
		"shared_preload_libraries = 'citus'",
		"max_prepared_transactions = 20",
		"track_functions = 'all'",
		"maintenance_work_mem = '256MB'"));
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION citus; CREATE EXTENSION pg_twotower');
	return $node;
}

my $coord = citus_node('coord');
my @workers = map { citus_node("worker$_") } (1, 2);

# The cluster: the workers by their socket directory and port.
sub add_nodes
{
	my ($db) = @_;
	$coord->safe_psql($db, "SELECT citus_set_coordinator_host('" . $coord->host . "', " . $coord->port . ")");
	$coord->safe_psql($db, "SELECT citus_add_node('" . $_->host . "', " . $_->port . ")") for @workers;
}
add_nodes('postgres');
is($coord->safe_psql('postgres', 'SELECT count(*) FROM citus_get_active_worker_nodes()'), '2', 'two active workers');

# 2000 items (distinct directions: no two distances tie for the queries below) over 4 shards,
# about 500 each, and the same rows in a plain table on the coordinator, the reference.
my $rows = q{SELECT g, g % 5, ARRAY[sin(g * 0.37), cos(g * 0.53), sin(g * 0.91) * cos(g * 0.11), cos(g * 0.07)]::real[]
	FROM generate_series(1, 2000) g};
# items (distributed over 4 shards) and items_ref (plain) with the same rows, in database $db.
sub make_items
{
	my ($db) = @_;
	$coord->safe_psql($db, qq{
		SET citus.shard_count = 4;
		CREATE TABLE items (id bigint PRIMARY KEY, category int, embedding real[]);
		SELECT create_distributed_table('items', 'id');
		INSERT INTO items $rows;
		CREATE TABLE items_ref (id bigint PRIMARY KEY, category int, embedding real[]);
		INSERT INTO items_ref $rows;
	});
}
make_items('postgres');
is($coord->safe_psql('postgres', q{SELECT count(*) FROM citus_shards WHERE table_name = 'items'::regclass}),
	'4', 'items is distributed over 4 shards');
is($coord->safe_psql('postgres', q{SELECT count(*) FROM pg_dist_partition WHERE logicalrelid = 'items_ref'::regclass}),
	'0', 'items_ref is a plain table of the coordinator');

# ---------------------------------------------------------------------------------------------
# The index: the operator class named with the extension's schema (public here), propagated
# to every shard.

my ($ret, $out, $err) = $coord->psql('postgres',
	'CREATE INDEX items_bad ON items USING twotower_hnsw (embedding twotower.real_cosine_ops)');
isnt($ret, 0, 'the operator class is not in schema twotower (since 0.8.0: the extension\'s schema)');
like($err, qr/operator class "twotower.real_cosine_ops" does not exist for access method "twotower_hnsw"/,
	'... and the error says so');
$coord->safe_psql('postgres', 'CREATE INDEX items_idx ON items USING twotower_hnsw (embedding public.real_cosine_ops)');
my $shard_index_sql = q{SET citus.show_shards_for_app_name_prefixes = '*';
	SELECT string_agg(c.relname || ':' || a.amname || ':' || t.relname, ',' ORDER BY c.relname)
	  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam
	  JOIN pg_class t ON t.oid = i.indrelid
	 WHERE c.relname ~ '^items_idx_[0-9]+$'};
my %shards_of;    # worker index => its shard tables of items
for my $w (0, 1)
{
	my $port = $workers[$w]->port;
	my @placed = split /\n/, $coord->safe_psql('postgres', qq{
		SELECT 'items_' || shardid FROM citus_shards WHERE table_name = 'items'::regclass AND nodeport = $port ORDER BY 1});
	$shards_of{$w} = \@placed;
	cmp_ok(scalar @placed, '>=', 1, "worker " . ($w + 1) . " holds shards of items (@placed)");
	my $want = join(',', map { (my $i = $_) =~ s/^items_/items_idx_/; "$i:twotower_hnsw:$_" } @placed);
	is($workers[$w]->safe_psql('postgres', $shard_index_sql), $want,
		'worker ' . ($w + 1) . ': each of its shards has its twotower_hnsw index');
}

# index_info on a shard's own index, on its worker, right after the build: every row of the
# shard in the graph.
my $w1shard = $shards_of{0}[0];
(my $w1idx = $w1shard) =~ s/^items_/items_idx_/;
my $show = q{SET citus.show_shards_for_app_name_prefixes = '*';};
is($workers[0]->safe_psql('postgres', "$show SELECT dims || ':' || metric || ':' || graph_items || ':' || delta_items FROM twotower.index_info('$w1idx')"),
	'4:cosine:' . $workers[0]->safe_psql('postgres', "$show SELECT count(*) FROM $w1shard") . ':0',
	"index_info on worker 1's shard index $w1idx: its dims, metric and every row of the shard");

# The same for every shard at once, from the coordinator: index_info through
# run_command_on_shards (each shard's twotower_hnsw index: its graph holds the shard's rows).
is($coord->safe_psql('postgres', q{SELECT string_agg(shardid || ':' || success || ':' || result, ',' ORDER BY shardid)
	FROM run_command_on_shards('items', $$SELECT string_agg(x.graph_items || ' ' || x.delta_items, ',')
	  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam,
	       twotower.index_info(i.indexrelid::regclass) x
	 WHERE i.indrelid = '%s'::regclass AND a.amname = 'twotower_hnsw'$$)}),
	$coord->safe_psql('postgres', q{SELECT string_agg(shardid || ':' || success || ':' || result || ' 0', ',' ORDER BY shardid)
	FROM run_command_on_shards('items', $$SELECT count(*) FROM %s$$)}),
	'index_info on every shard index through run_command_on_shards: each graph holds its shard\'s rows');

# ---------------------------------------------------------------------------------------------
# ORDER BY <=> LIMIT on the coordinator = the exact top k.

my @queries = ('{0.2,0.4,-0.1,0.5}', '{-0.7,0.1,0.3,0.2}', '{0.5,-0.5,0.5,-0.5}', '{0.1,0.9,0.1,-0.3}', '{-0.2,-0.3,-0.8,0.4}');
my $exact = 'SET enable_indexscan = off; SET enable_bitmapscan = off;';
# Settings for the shards (SET LOCAL in a transaction, propagated by Citus) for k larger than a
# shard: no sequential scan, so that the shard is still read through its index, and ef_search
# above k (the ordered scan's search does not widen to the LIMIT by itself: with the default
# 100 and strict_order, a scan of all ~500 rows of a shard can leave one out).
my $index_only = "BEGIN; SET LOCAL citus.propagate_set_commands = 'local'; SET LOCAL enable_seqscan = off;
	SET LOCAL twotower.ef_search = 1000;";

# The ids of the top $k for $q, one string, from $table ($where applied), on $node as $user.
sub topk
{
	my ($table, $q, $k, %o) = @_;
	my $where = $o{where} ? "WHERE $o{where}" : '';
	my $order = $table eq 'items_ref' ? "embedding <=> '$q', id" : "embedding <=> '$q'";
	my $sql = ($table eq 'items_ref' ? $exact : '') . ($o{settings} // '')
	  . " SELECT string_agg(id::text, ',') FROM (SELECT id FROM $table $where ORDER BY $order LIMIT $k) s;";
	$sql = "$index_only $sql COMMIT;" if $o{index_only};
	return ($o{node} // $coord)->safe_psql('postgres', $sql, $o{user} ? (extra_params => [ '-U', $o{user} ]) : ());
}

for my $q (@queries)
{
	is($coord->safe_psql('postgres', "SELECT count(DISTINCT embedding <=> '$q') FROM items_ref"), '2000',
		"query $q: no two distances tie");
}
for my $k (10, 600)
{
	my $same = 0;
	for my $q (@queries)
	{
		my ($got, $want) = (topk('items', $q, $k, index_only => $k > 500), topk('items_ref', $q, $k));
		my @g = split /,/, $got;
		$same++ if $got eq $want && @g == $k;
		diag("k $k, query $q:\n got  $got\n want $want") if $got ne $want;
	}
	is($same, scalar @queries, "k $k: the distributed ORDER BY <=> LIMIT equals the exact top k for every query");
}
my $smallest = $coord->safe_psql('postgres', q{SELECT min(n) FROM (SELECT count(*) AS n FROM items GROUP BY get_shard_id_for_distribution_column('items', id)) s});
cmp_ok($smallest, '<', 600, "k 600 is more than a shard holds (the smallest has $smallest rows)");

# Each task is an ordered scan of its shard's index, with the LIMIT pushed down; the
# coordinator merges by distance.
sub tasks_plan
{
	my ($sql, $index) = @_;
	my $explain = "SET citus.explain_all_tasks = on; EXPLAIN (VERBOSE, COSTS OFF) $sql;";
	return $coord->safe_psql('postgres', $index ? "$index_only $explain COMMIT;" : $explain);
}
for my $k (10, 600)
{
	# (k 600: with enable_seqscan off on the shards, as above; left to themselves they sort
	# their ~500 rows.)
	my $plan = tasks_plan("SELECT id FROM items ORDER BY embedding <=> '$queries[0]' LIMIT $k", $k > 500);
	my @scans = $plan =~ /->  Limit\n\s+Output: [^\n]*\n\s+->  Index Scan using items_idx_\d+ on public\.items_\d+ items\n[^\n]*\n\s+Order By: \(items\.embedding <=> /g;
	is(scalar @scans, 4, "k $k: each of the 4 tasks is a Limit over an ordered scan of its shard's twotower_hnsw index")
	  or diag($plan);
	like($plan, qr/Custom Scan \(Citus Adaptive\).*Task Count: 4/s, "k $k: one Citus adaptive scan of 4 tasks");
	like($plan, qr/Query: SELECT id, \(embedding OPERATOR\(public\.<=>\) [^\n]* ORDER BY \(embedding OPERATOR\(public\.<=>\) [^\n]*\) LIMIT '$k'::bigint/,
		"k $k: the shard query carries ORDER BY <=> and LIMIT $k");
	like($plan, qr/Sort Key: remote_scan\.worker_column_\d+\n/, "k $k: the coordinator merges the tasks' rows by distance");
}

# Exclusions and a filter reach the shards and give the exact answer.
my @top = split /,/, topk('items_ref', $queries[0], 10);
my $ex = join(',', @top[0 .. 4]);
my $exclude = "id <> ALL ('{$ex}'::bigint[])";
for my $q (@queries)
{
	is(topk('items', $q, 10, where => $exclude), topk('items_ref', $q, 10, where => $exclude), "query $q: exclusions, exact top 10");
}
like(tasks_plan("SELECT id FROM items WHERE $exclude ORDER BY embedding <=> '$queries[0]' LIMIT 10"),
	qr/Query: SELECT id, [^\n]*WHERE \(id OPERATOR\(pg_catalog\.<>\) ALL \('\{$ex\}'::bigint\[\]\)\)[^\n]* LIMIT '10'::bigint/,
	'the exclusions are in the shard query');
my @ex_top = split /,/, topk('items', $queries[0], 10, where => $exclude);
ok(!(grep { my $e = $_; grep { $_ eq $e } @top[0 .. 4] } @ex_top) && @ex_top == 10, 'no excluded id comes back');
for my $q (@queries)
{
	is(topk('items', $q, 10, where => 'category = 3'), topk('items_ref', $q, 10, where => 'category = 3'),
		"query $q: WHERE category = 3, exact top 10");
}
like(tasks_plan("SELECT id FROM items WHERE category = 3 ORDER BY embedding <=> '$queries[0]' LIMIT 10"),
	qr/Query: SELECT id, [^\n]*WHERE \(category OPERATOR\(pg_catalog\.=\) 3\)[^\n]* LIMIT '10'::bigint/,
	'the filter is in the shard query');

# A row written on the coordinator (to its shard on a worker) is found at once.
$coord->safe_psql('postgres', "INSERT INTO items VALUES (5000, 1, '{0.2,0.4,-0.1,0.5}')");
like(topk('items', $queries[0], 3), qr/^5000,/, 'a row inserted on the coordinator is the nearest at once');
$coord->safe_psql('postgres', 'DELETE FROM items WHERE id = 5000');
is(topk('items', $queries[0], 10), topk('items_ref', $queries[0], 10), 'and gone once deleted');

# ---------------------------------------------------------------------------------------------
# A worker that is down: the query fails, naming the worker; back once it is restarted.

my $ref10 = topk('items_ref', $queries[0], 10);
$workers[1]->stop('fast');
($ret, $out, $err) = $coord->psql('postgres', "SELECT id FROM items ORDER BY embedding <=> '$queries[0]' LIMIT 10");
isnt($ret, 0, 'with worker 2 down the query fails (no silently partial top k)');
my ($h2, $p2) = ($workers[1]->host, $workers[1]->port);
like($err, qr/connection to the remote node \S*\Q$h2\E:$p2 failed/, 'the error names worker 2 (its host and port)');
$workers[1]->start;
is(topk('items', $queries[0], 10), $ref10, 'worker 2 restarted: the query answers exactly again');

# ---------------------------------------------------------------------------------------------
# twotower.ef_search on the shards. A probe: current_setting() in the shard query (pushed down
# with its GROUP BY, so each task reports its own session's value).

# (A worker session that has not loaded pg_twotower yet has no such setting: 'unset'.)
my $probe = q{SELECT string_agg(s || ':' || n, ',') FROM (SELECT coalesce(current_setting('twotower.ef_search', true), 'unset') AS s,
	count(*) AS n FROM items GROUP BY 1) x};
like(tasks_plan($probe), qr/Query: SELECT COALESCE\(current_setting\('twotower\.ef_search'::text, true\)/, 'the probe runs on the shards');
my $session_set = $coord->safe_psql('postgres', "SET twotower.ef_search = 333; $probe");
ok($session_set =~ /^(100|unset):2000$/,
	"a session SET on the coordinator does not reach the shards (they keep their own setting: $session_set)");
is($coord->safe_psql('postgres', "BEGIN; SET LOCAL citus.propagate_set_commands = 'local'; SET LOCAL twotower.ef_search = 444; $probe; COMMIT;"),
	'444:2000', "SET LOCAL in a transaction with citus.propagate_set_commands = 'local' reaches every shard");
is($coord->safe_psql('postgres', "BEGIN; SET LOCAL citus.propagate_set_commands = 'local'; SET LOCAL twotower.ef_search = 444;
	SELECT string_agg(id::text, ',') FROM (SELECT id FROM items ORDER BY embedding <=> '$queries[1]' LIMIT 10) s; COMMIT;"),
	topk('items_ref', $queries[1], 10), '... and the top 10 searched with it is exact');
$coord->safe_psql('postgres', 'CREATE ROLE tuned LOGIN; GRANT SELECT ON items TO tuned; ALTER ROLE tuned SET twotower.ef_search = 77');
is($coord->safe_psql('postgres', $probe, extra_params => [ '-U', 'tuned' ]), '77:2000',
	'ALTER ROLE ... SET twotower.ef_search (propagated by Citus) reaches the shards');

# ---------------------------------------------------------------------------------------------
# Privileges: the distributed table's.

$coord->safe_psql('postgres', 'CREATE ROLE reader LOGIN; CREATE ROLE stranger LOGIN; GRANT SELECT ON items TO reader');
($ret, $out, $err) = $coord->psql('postgres', "SELECT id FROM items ORDER BY embedding <=> '$queries[0]' LIMIT 10",
	extra_params => [ '-U', 'stranger' ]);
isnt($ret, 0, 'a role without SELECT on the distributed table cannot search it');
like($err, qr/permission denied for table items/, '... a permission error (42501)');
is(topk('items', $queries[0], 10, user => 'reader'), $ref10, 'a role granted SELECT on it gets the exact top 10');

# ---------------------------------------------------------------------------------------------
# The extension's functions: what works today.

# recall() on a worker, over its shard's index, with the model imported there too: the shard's
# exact top 10.
my $model = q{SELECT twotower.import_model('q4', '{"format": "pg_twotower.tower", "spec_version": 1,
	"kind": "user", "features": [{"name": "q", "type": "dense", "dim": 4}], "layers": [],
	"output": {"dim": 4, "metric": "cosine"}}', '\x02000000000000007b7d')};
$workers[0]->safe_psql('postgres', $model);
is($workers[0]->safe_psql('postgres', "$show SELECT string_agg(item_id::text, ',' ORDER BY rank) FROM twotower.recall('q4', '$w1idx', '{\"q\": [0.2, 0.4, -0.1, 0.5]}', 10)"),
	$workers[0]->safe_psql('postgres', "$show $exact SELECT string_agg(id::text, ',') FROM (SELECT id FROM $w1shard ORDER BY embedding <=> '$queries[0]', id LIMIT 10) s"),
	"recall() on worker 1 over its shard index: the shard's exact top 10");

# The user tower on the coordinator, its vector shipped to the shards as a constant (a scalar
# subquery: evaluated once, before the shard queries are built).
$coord->safe_psql('postgres', $model);
is($coord->safe_psql('postgres', q{SELECT string_agg(id::text, ',') FROM (SELECT id FROM items
	ORDER BY embedding <=> (SELECT twotower.embed_user('q4', '{"q": [0.2, 0.4, -0.1, 0.5]}')) LIMIT 10) s}),
	$ref10, 'ORDER BY embedding <=> (SELECT twotower.embed_user(...)) LIMIT 10: the exact top 10');
# distribute_model copies the model to the workers: then the unwrapped embed_user Citus ships
# to them finds it too.
my $unwrapped = q{SELECT string_agg(id::text, ',') FROM (SELECT id FROM items
	ORDER BY embedding <=> twotower.embed_user('q4', '{"q": [0.2, 0.4, -0.1, 0.5]}') LIMIT 10) s};
($ret, $out, $err) = $coord->psql('postgres', $unwrapped);
like($err, qr/model "q4" does not exist/, 'before: the unwrapped embed_user fails on the worker without the model');
is($coord->safe_psql('postgres', q{SELECT count(*) || ':' || bool_and(d.version = 1 OR d.version = 2) FROM twotower.distribute_model('q4') d}),
	'2:true', 'distribute_model: each worker imported the model as a new version');
is($coord->safe_psql('postgres', $unwrapped), $ref10,
	'... and the unwrapped embed_user works on the workers: the exact top 10');
is($workers[0]->safe_psql('postgres', q{SELECT twotower.embed_user('q4', '{"q": [0.2, 0.4, -0.1, 0.5]}')::text}),
	$coord->safe_psql('postgres', q{SELECT twotower.embed_user('q4', '{"q": [0.2, 0.4, -0.1, 0.5]}')::text}),
	'... with the vectors the coordinator computes');
($ret, $out, $err) = $coord->psql('postgres', q{SELECT * FROM twotower.distribute_model('no_such_model')});
like($err, qr/no_such_model/, 'distribute_model of an unknown model is an error naming it');
($ret, $out, $err) = $workers[0]->psql('postgres', q{SELECT * FROM twotower.distribute_model('q4')});
like($err, qr/not a Citus coordinator/, 'distribute_model on a worker is refused');

# refresh_item_vectors from a plain catalogue into a distributed, indexed vector table (rows
# upserted through the coordinator; delete_missing => false: its DELETE would join the two).
$coord->safe_psql('postgres', q{
	SELECT twotower.import_model('i4', '{"format": "pg_twotower.tower", "spec_version": 1,
	  "kind": "item", "features": [{"name": "f", "type": "dense", "dim": 4}], "layers": [],
	  "output": {"dim": 4, "metric": "cosine"}}', '\x02000000000000007b7d');
	CREATE TABLE catalog (item_id bigint PRIMARY KEY, f real[]);
	INSERT INTO catalog SELECT id, embedding FROM items_ref;
	CREATE TABLE vecs (id bigint PRIMARY KEY, embedding real[]);
	SELECT create_distributed_table('vecs', 'id');
	CREATE INDEX vecs_idx ON vecs USING twotower_hnsw (embedding public.real_cosine_ops);
});
is($coord->safe_psql('postgres', q{SELECT inserted || '/' || updated || '/' || unchanged
	FROM twotower.refresh_item_vectors('i4', 'catalog', 'vecs', id_column => 'item_id', delete_missing => false)}),
	'2000/0/0', 'refresh_item_vectors from a plain catalogue into a distributed table: 2000 inserted');
is($coord->safe_psql('postgres', q{SELECT md5(string_agg(id || ':' || embedding::text, ',' ORDER BY id)) FROM vecs}),
	$coord->safe_psql('postgres', q{SELECT md5(string_agg(item_id || ':' || f::text, ',' ORDER BY item_id)) FROM catalog}),
	'... every vector is the item tower of its row');
$coord->safe_psql('postgres', q{UPDATE catalog SET f = '{0.2,0.4,-0.1,0.5}' WHERE item_id = 7});
is($coord->safe_psql('postgres', q{SELECT inserted || '/' || updated || '/' || unchanged
	FROM twotower.refresh_item_vectors('i4', 'catalog', 'vecs', id_column => 'item_id', delete_missing => false)}),
	'0/1/1999', 'a second refresh after one change: 1 updated, 1999 unchanged');
like($coord->safe_psql('postgres', q{SELECT string_agg(id::text, ',') FROM (SELECT id FROM vecs ORDER BY embedding <=> '{0.2,0.4,-0.1,0.5}' LIMIT 3) s}),
	qr/^7,/, '... and the updated item is found at once through the shards\' indexes');
# delete_missing (the default) between a plain catalogue and a distributed vector table: the
# rows whose item is gone are deleted (it failed: "relation catalog is not distributed").
$coord->safe_psql('postgres', q{DELETE FROM catalog WHERE item_id IN (3, 5, 8)});
is($coord->safe_psql('postgres', q{SELECT inserted || '/' || updated || '/' || deleted || '/' || unchanged
	FROM twotower.refresh_item_vectors('i4', 'catalog', 'vecs', id_column => 'item_id')}),
	'0/0/3/1997', 'delete_missing from a plain catalogue into a distributed table: the 3 rows gone are deleted');
is($coord->safe_psql('postgres', q{SELECT count(*) || ':' || count(*) FILTER (WHERE id IN (3, 5, 8)) FROM vecs}), '1997:0',
	'... and only those');

# refresh_item_vectors from a distributed catalogue: each row's features reach the tower under
# their own names (a to_jsonb of the row came back from Citus with keys f1, f2, … and every
# vector was the zero vector).
$coord->safe_psql('postgres', q{
	CREATE TABLE dcatalog (item_id bigint PRIMARY KEY, f real[]);
	SELECT create_distributed_table('dcatalog', 'item_id');
	INSERT INTO dcatalog SELECT id, embedding FROM items_ref;
	CREATE TABLE dvecs (id bigint PRIMARY KEY, embedding real[]);
	SELECT create_distributed_table('dvecs', 'id');
});
is($coord->safe_psql('postgres', q{SELECT inserted || '/' || updated || '/' || unchanged
	FROM twotower.refresh_item_vectors('i4', 'dcatalog', 'dvecs', id_column => 'item_id', delete_missing => false)}),
	'2000/0/0', 'refresh_item_vectors from a distributed catalogue: 2000 inserted');
is($coord->safe_psql('postgres', q{SELECT md5(string_agg(id || ':' || embedding::text, ',' ORDER BY id)) FROM dvecs}),
	$coord->safe_psql('postgres', q{SELECT md5(string_agg(item_id || ':' || f::text, ',' ORDER BY item_id)) FROM dcatalog}),
	'... every vector is the item tower of its row (not a zero vector)');
# Co-located on their ids, the two tables are refreshed shard by shard on the workers: each
# worker ran the item tower (shipped with the statement) on its own rows.
# (Citus's connections to the workers report their function statistics when they go idle:
# polled for up to 30 s.)
my $calls = sub {
	return map {
		$_->safe_psql('postgres', q{SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions WHERE funcname = 'embed_item_shipped'})
	} @workers;
};
my ($c1, $c2) = $calls->();
for (1 .. 60)
{
	last if $c1 + $c2 >= 2000;
	select(undef, undef, undef, 0.5);
	($c1, $c2) = $calls->();
}
ok($c1 > 0 && $c2 > 0 && $c1 + $c2 == 2000, "... computed on the workers, where the rows are ($c1 and $c2 rows)");
is($coord->safe_psql('postgres', q{SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions WHERE funcname = 'embed_item_shipped'}),
	'0', '... none on the coordinator');
$coord->safe_psql('postgres', q{UPDATE dcatalog SET f = '{0.2,0.4,-0.1,0.5}' WHERE item_id = 9});
is($coord->safe_psql('postgres', q{SELECT inserted || '/' || updated || '/' || unchanged
	FROM twotower.refresh_item_vectors('i4', 'dcatalog', 'dvecs', id_column => 'item_id', delete_missing => false)}),
	'0/1/1999', '... a second refresh on the workers after one change: 1 updated, 1999 unchanged');
is($coord->safe_psql('postgres', q{SELECT embedding::text FROM dvecs WHERE id = 9}), '{0.2,0.4,-0.1,0.5}',
	'... with the new vector');
# A model file that does not match its checksum is refused by the workers' function (any role
# may call it: it reads nothing).
($ret, $out, $err) = $coord->psql('postgres', q{SELECT twotower.embed_item_shipped(1, '{}', '\x00', 1, '{}')});
like($err, qr/do not match its checksum/, 'embed_item_shipped refuses files that do not match the checksum');
# ... and delete_missing from the distributed catalogue into a plain vector table.
$coord->safe_psql('postgres', q{
	CREATE TABLE lvecs (id bigint PRIMARY KEY, embedding real[]);
	INSERT INTO lvecs SELECT id, embedding FROM dvecs;
	DELETE FROM dcatalog WHERE item_id IN (11, 12);
});
is($coord->safe_psql('postgres', q{SELECT inserted || '/' || updated || '/' || deleted || '/' || unchanged
	FROM twotower.refresh_item_vectors('i4', 'dcatalog', 'lvecs', id_column => 'item_id')}),
	'0/0/2/1998', 'delete_missing from a distributed catalogue into a plain table: the 2 rows gone are deleted');

# recall() on the coordinator's index of a distributed table: the ordered query on every
# shard's index, merged by Citus; the exact top k of the same rows in the plain table, for k 10
# and for k larger than a shard, with exclusions pushed down. (It was refused: "recall() does
# not read Citus tables yet".)
my $recall = sub {
	my ($k, $exclude) = @_;
	return $coord->safe_psql('postgres', qq{SELECT string_agg(item_id::text, ',' ORDER BY rank)
		FROM twotower.recall('q4', 'items_idx', '{"q": [0.2, 0.4, -0.1, 0.5]}', $k, exclude => '$exclude')});
};
is($recall->(10, '{}'), $ref10, 'recall() on the coordinator over a distributed table: the exact top 10');
is($recall->(600, '{}'), topk('items_ref', $queries[0], 600), '... and the exact top 600 (more than a shard holds)');
my @first3 = (split /,/, $ref10)[0 .. 2];
is($recall->(10, '{' . join(',', @first3) . '}'),
	topk('items_ref', $queries[0], 10, where => 'id NOT IN (' . join(',', @first3) . ')'),
	'... with exclusions: the exact top 10 of the other rows');
($ret, $out, $err) = $coord->psql('postgres',
	q{SELECT count(*) FROM twotower.recall('q4', 'items_idx', '{"q": [0.2, 0.4, -0.1, 0.5]}', 10, ef_search => 50)});
like($err, qr/ef_search cannot be passed to the shards of a Citus table/,
	'an explicit ef_search cannot reach the shards: an error that says how to set it');

# evaluate() against the index of a distributed table: each query's list through Citus (every
# shard's index), the exact ranking over the rows read through the coordinator. The targets:
# each query's 5th nearest in the plain table (so HR@10 is 1 and HR@3 is 0 exactly). The same
# figures as evaluate() over the plain table's rows by exact ranking. (It stopped with the
# shell-index error.)
my $qarray = "ARRAY['" . join("','", @queries[0 .. 4]) . "']::text[]";
$coord->safe_psql('postgres', qq{
	CREATE TABLE eval_q AS SELECT n AS user_id, jsonb_build_object('q', q::real[]) AS features,
	       (SELECT id FROM items_ref ORDER BY embedding <=> q::real[], id OFFSET 4 LIMIT 1) AS target
	  FROM unnest($qarray) WITH ORDINALITY AS u(q, n);
});
my $eval = q{SELECT string_agg(method || ':' || metric || '@' || k || '=' || round(value::numeric, 6) || '/' || queries, ' '
	ORDER BY method, metric, k) FROM twotower.evaluate('q4', '%s', 'eval_q', k => '{3,10}', via_index => %s)};
my $dist_eval = $coord->safe_psql('postgres', sprintf($eval, 'items_idx', 'true'));
like($dist_eval, qr/index:hr\@10=1\.000000\/5/, 'evaluate() over the distributed index: every target in the top 10 through Citus');
like($dist_eval, qr/index:hr\@3=0\.000000\/5/, '... and none in the top 3');
my ($exact_dist) = $dist_eval =~ /(exact:.*?)(?= index:|$)/;
$coord->safe_psql('postgres', 'CREATE INDEX items_ref_eval_idx ON items_ref USING twotower_hnsw (embedding public.real_cosine_ops)');
my ($exact_ref) = $coord->safe_psql('postgres', sprintf($eval, 'items_ref_eval_idx', 'false')) =~ /(exact:.*?)(?= index:|$)/;
like($exact_dist, qr/^exact:hr\@3=0\.000000\/5 exact:hr\@10=1\.000000\/5 exact:mrr\@3=0\.200000\/5 /, '... the exact ranking of the distributed rows too');
is($exact_dist, $exact_ref, '... and it equals the plain table\'s');
$coord->safe_psql('postgres', 'DROP INDEX items_ref_eval_idx');

# recommend() over the distributed table equals the same pipeline over the plain table holding
# the same rows (its own index), on one server.
$coord->safe_psql('postgres', q{
	CREATE INDEX items_ref_idx ON items_ref USING twotower_hnsw (embedding public.real_cosine_ops);
	SELECT twotower.save_pipeline('dist', '{"user_model": "q4", "vectors": {"table": "items"},
	  "channels": [{"type": "twotower", "index": "items_idx", "k": 50}],
	  "stages": [{"type": "twotower", "keep": 20}], "k": 20}');
	SELECT twotower.save_pipeline('single', '{"user_model": "q4", "vectors": {"table": "items_ref"},
	  "channels": [{"type": "twotower", "index": "items_ref_idx", "k": 50}],
	  "stages": [{"type": "twotower", "keep": 20}], "k": 20}');
});
my $rec = sub {
	my ($p) = @_;
	return $coord->safe_psql('postgres', qq{SELECT string_agg(item_id || ':' || round(score::numeric, 5), ',' ORDER BY rank)
		FROM twotower.recommend('$p', '{"q": [0.2, 0.4, -0.1, 0.5]}', exclude => '{$first3[0]}')});
};
my $single = $rec->('single');
like($single, qr/^(\d+:[-0-9.]+,){19}\d+:[-0-9.]+$/, 'recommend() on one server: 20 items with scores');
is($rec->('dist'), $single, 'recommend() over the distributed table: the same items and scores as on one server');

# index_info() on the coordinator's index of a distributed table: one row per shard's index, in
# shard id order, each as the shard's own index_info (it was an error naming Citus; the shell
# index on the coordinator holds nothing).
is($coord->safe_psql('postgres', q{SELECT string_agg(dims || ':' || metric || ':' || graph_items || ':' || delta_items, ',') FROM twotower.index_info('items_idx')}),
	$coord->safe_psql('postgres', q{SELECT string_agg(result, ',' ORDER BY shardid)
	FROM run_command_on_shards('items', $$SELECT x.dims || ':' || x.metric || ':' || x.graph_items || ':' || x.delta_items
	  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid,
	       twotower.index_info(i.indexrelid::regclass) x
	 WHERE i.indrelid = '%s'::regclass AND c.relname ~ '^items_idx_[0-9]+$'$$)}),
	'index_info() on the coordinator: a row per shard, each the shard index\'s own');
like($coord->safe_psql('postgres', q{SELECT sum(graph_items + delta_items) FROM twotower.index_info('items_idx')}), qr/^20\d\d$/,
	'... together every row of the table (2000 and the rows written since)');

# Maintenance on the shards from the coordinator: index options reach every shard's index,
# inserts fold on the shards (VACUUM propagated), REINDEX INDEX CONCURRENTLY rebuilds every
# shard's index, and searches stay exact throughout.
$coord->safe_psql('postgres', 'CREATE INDEX items_m8 ON items USING twotower_hnsw (embedding public.real_l2_ops) WITH (m = 8, fold_threshold = 100)');
is($workers[0]->safe_psql('postgres', q{SET citus.show_shards_for_app_name_prefixes = '*';
	SELECT count(*) FROM pg_class WHERE relname ~ '^items_m8_[0-9]+$' AND reloptions @> '{m=8,fold_threshold=100}'}),
	$coord->safe_psql('postgres', "SELECT count(*) FROM citus_shards WHERE table_name = 'items'::regclass AND nodeport = " . $workers[0]->port),
	'index options in WITH reach each of worker 1\'s shard indexes');
$coord->safe_psql('postgres', q{INSERT INTO items SELECT g, g % 5, ARRAY[sin(g * 0.37), cos(g * 0.53), sin(g * 0.91) * cos(g * 0.11), cos(g * 0.07)]::real[]
	FROM generate_series(2001, 3000) g;
	INSERT INTO items_ref SELECT g, g % 5, ARRAY[sin(g * 0.37), cos(g * 0.53), sin(g * 0.91) * cos(g * 0.11), cos(g * 0.07)]::real[]
	FROM generate_series(2001, 3000) g;
	VACUUM items});
cmp_ok($coord->safe_psql('postgres', q{SELECT sum(delta_graph_items) FROM twotower.index_info('items_m8')}), '>', 0,
	'1000 rows inserted through the coordinator: the shards\' indexes folded them into their delta graphs');
my $ref_l2 = $coord->safe_psql('postgres', qq{$exact SELECT string_agg(id::text, ',') FROM (SELECT id FROM items_ref ORDER BY embedding <-> '$queries[1]', id LIMIT 10) s});
is($coord->safe_psql('postgres', qq{SELECT string_agg(id::text, ',') FROM (SELECT id FROM items ORDER BY embedding <-> '$queries[1]' LIMIT 10) s}),
	$ref_l2, '... and the shards\' searches stay exact');
$coord->safe_psql('postgres', 'REINDEX INDEX CONCURRENTLY items_m8');
is($coord->safe_psql('postgres', q{SELECT sum(graph_items) || ':' || sum(delta_items) || ':' || sum(delta_graph_items) FROM twotower.index_info('items_m8')}),
	'3000:0:0', 'REINDEX INDEX CONCURRENTLY on the coordinator rebuilt every shard\'s index: every row in the graphs');
is($coord->safe_psql('postgres', qq{SELECT string_agg(id::text, ',') FROM (SELECT id FROM items ORDER BY embedding <-> '$queries[1]' LIMIT 10) s}),
	$ref_l2, '... and the search is still exact');
$coord->safe_psql('postgres', 'DROP INDEX items_m8; DELETE FROM items WHERE id > 2000; DELETE FROM items_ref WHERE id > 2000');

# Channels and training over a distributed interactions table, read through the coordinator:
# the same neighbours, recall and training examples as from a plain table with the same rows.
$coord->safe_psql('postgres', q{CREATE TABLE ev (user_id int, item_id bigint, ts timestamptz);
	SELECT create_distributed_table('ev', 'user_id');
	INSERT INTO ev SELECT u, 1 + (u * 7 + t * 13) % 200, timestamptz '2026-01-01' + make_interval(secs => u * 100 + t)
	  FROM generate_series(1, 300) u, generate_series(1, 8) t;
	CREATE TABLE ev_plain AS SELECT * FROM ev;
	SELECT count(*) FROM twotower.build_channel('ev_cf', 'itemcf', 'ev', 'ev_cf_nb');
	SELECT count(*) FROM twotower.build_channel('ev_cf_plain', 'itemcf', 'ev_plain', 'ev_cf_plain_nb');});
is($coord->safe_psql('postgres', q{SELECT md5(string_agg(item_id || ':' || neighbor_id || ':' || round(score::numeric, 5), ',' ORDER BY item_id, neighbor_id)) FROM ev_cf_nb}),
	$coord->safe_psql('postgres', q{SELECT md5(string_agg(item_id || ':' || neighbor_id || ':' || round(score::numeric, 5), ',' ORDER BY item_id, neighbor_id)) FROM ev_cf_plain_nb}),
	'build_channel over a distributed interactions table: the same neighbours as over a plain copy');
is($coord->safe_psql('postgres', q{SELECT string_agg(item_id::text, ',' ORDER BY rank) FROM twotower.i2i_recall('ev_cf', '{1,2,3}', k => 10)}),
	$coord->safe_psql('postgres', q{SELECT string_agg(item_id::text, ',' ORDER BY rank) FROM twotower.i2i_recall('ev_cf_plain', '{1,2,3}', k => 10)}),
	'... and i2i_recall over it the same items');
my $train = q{SELECT train_examples FROM twotower.train('%s_u', '%s_i', '%s', '{"dim": 4, "epochs": 1, "user": {"features": [{"name": "user_id", "type": "categorical"}]}, "item": {"features": [{"name": "item_id", "type": "categorical"}]}}') WHERE kind = 'user'};
my $examples = $coord->safe_psql('postgres', "SET client_min_messages = warning; " . sprintf($train, 'ev', 'ev', 'ev'));
like($examples, qr/^[1-9]\d*$/, "train over the distributed interactions: $examples training examples");
is($examples, $coord->safe_psql('postgres', "SET client_min_messages = warning; " . sprintf($train, 'evp', 'evp', 'ev_plain')),
	'... as many as over the plain copy');
like($coord->safe_psql('postgres', q{SELECT md5(string_agg(item_id || ':' || neighbor_id, ',' ORDER BY item_id, neighbor_id)) FROM ev_cf_nb}),
	qr/^[0-9a-f]{32}$/, '... (the neighbour tables compared above are not empty)');

# A channel's neighbour table as a Citus reference table (a copy on every node): i2i_recall
# reads it as before, and a rebuild (TRUNCATE and INSERT) and a refresh write every copy.
my $nb_md5 = q{SELECT md5(string_agg(item_id || ':' || neighbor_id || ':' || round(score::numeric, 5), ',' ORDER BY item_id, neighbor_id)) FROM %s};
$coord->safe_psql('postgres', q{SET client_min_messages = warning;
	SELECT create_reference_table('ev_cf_nb');
	SELECT truncate_local_data_after_distributing_table('ev_cf_nb')});
is($coord->safe_psql('postgres', q{SELECT string_agg(item_id::text, ',' ORDER BY rank) FROM twotower.i2i_recall('ev_cf', '{1,2,3}', k => 10)}),
	$coord->safe_psql('postgres', q{SELECT string_agg(item_id::text, ',' ORDER BY rank) FROM twotower.i2i_recall('ev_cf_plain', '{1,2,3}', k => 10)}),
	'a neighbour table made a reference table: i2i_recall the same items');
$coord->safe_psql('postgres', q{INSERT INTO ev SELECT u, 1 + (u * 11) % 200, timestamptz '2026-02-01' + make_interval(secs => u) FROM generate_series(1, 300) u;
	INSERT INTO ev_plain SELECT u, 1 + (u * 11) % 200, timestamptz '2026-02-01' + make_interval(secs => u) FROM generate_series(1, 300) u;
	SELECT count(*) FROM twotower.build_channel('ev_cf', 'itemcf', 'ev', 'ev_cf_nb');
	SELECT count(*) FROM twotower.build_channel('ev_cf_plain', 'itemcf', 'ev_plain', 'ev_cf_plain_nb');});
my $want_nb = $coord->safe_psql('postgres', sprintf($nb_md5, 'ev_cf_plain_nb'));
is($coord->safe_psql('postgres', sprintf($nb_md5, 'ev_cf_nb')), $want_nb,
	'... a rebuild writes it: the neighbours of the plain copy');
is($coord->safe_psql('postgres', q{SELECT string_agg(DISTINCT result, ',') FROM run_command_on_placements('ev_cf_nb',
	$$SELECT md5(string_agg(item_id || ':' || neighbor_id || ':' || round(score::numeric, 5), ',' ORDER BY item_id, neighbor_id)) FROM %s$$)}),
	$want_nb, '... on every node\'s copy');
$coord->safe_psql('postgres', q{INSERT INTO ev SELECT u, 1 + (u * 17) % 200, timestamptz '2026-03-01' + make_interval(secs => u) FROM generate_series(1, 300, 3) u;
	INSERT INTO ev_plain SELECT u, 1 + (u * 17) % 200, timestamptz '2026-03-01' + make_interval(secs => u) FROM generate_series(1, 300, 3) u;
	SELECT count(*) FROM twotower.refresh_channel('ev_cf');
	SELECT count(*) FROM twotower.refresh_channel('ev_cf_plain');});
$want_nb = $coord->safe_psql('postgres', sprintf($nb_md5, 'ev_cf_plain_nb'));
is($coord->safe_psql('postgres', sprintf($nb_md5, 'ev_cf_nb')), $want_nb,
	'... a refresh writes it too: the neighbours of the refreshed plain copy');

# ---------------------------------------------------------------------------------------------
# The extension in a schema of its own, not on the workers' search_path: the operator class
# must then be schema-qualified (Citus sends the CREATE INDEX as written, and the workers do not
# resolve it); the default class and qualified names work.

for my $node ($coord, @workers)
{
	$node->safe_psql('postgres', 'CREATE DATABASE ext_schema') unless $node == $coord;
}
$coord->safe_psql('postgres', 'CREATE DATABASE ext_schema');
for my $node ($coord, @workers)
{
	$node->safe_psql('ext_schema', 'CREATE EXTENSION citus; CREATE SCHEMA tt; CREATE EXTENSION pg_twotower SCHEMA tt');
}
add_nodes('ext_schema');
make_items('ext_schema');
($ret, $out, $err) = $coord->psql('ext_schema',
	'SET search_path = public, tt; CREATE INDEX items_unq ON items USING twotower_hnsw (embedding real_l2_ops)');
isnt($ret, 0, 'extension in schema tt: CREATE INDEX with the unqualified operator class fails');
like($err, qr/operator class "real_l2_ops" does not exist for access method "twotower_hnsw"\nCONTEXT:  while executing command on \S+:\d+/,
	'... on a worker (the error names it), although the coordinator\'s search_path resolves it');
$coord->safe_psql('ext_schema', 'CREATE INDEX items_q ON items USING twotower_hnsw (embedding tt.real_l2_ops)');
is($workers[0]->safe_psql('ext_schema', q{SET citus.show_shards_for_app_name_prefixes = '*';
	SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_opclass o ON o.oid = i.indclass[0]
	 WHERE c.relname ~ '^items_q_[0-9]+$' AND o.opcname = 'real_l2_ops'}),
	$coord->safe_psql('ext_schema',
		"SELECT count(*) FROM citus_shards WHERE table_name = 'items'::regclass AND nodeport = " . $workers[0]->port),
	'... the schema-qualified class tt.real_l2_ops: an index on each of worker 1\'s shards');
is($coord->safe_psql('ext_schema', q{SELECT string_agg(id::text, ',') FROM (SELECT id FROM items ORDER BY embedding OPERATOR(tt.<->) '{0.2,0.4,-0.1,0.5}' LIMIT 10) s}),
	$coord->safe_psql('ext_schema', qq{$exact SELECT string_agg(id::text, ',') FROM (SELECT id FROM items_ref ORDER BY embedding OPERATOR(tt.<->) '{0.2,0.4,-0.1,0.5}', id LIMIT 10) s}),
	'... and searched through it: the exact top 10');

$_->stop for ($coord, @workers);
done_testing();
