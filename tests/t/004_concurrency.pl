# Mixed load: ordered (filtered) queries, inserts, deletes, VACUUM and REINDEX CONCURRENTLY at the
# same time, with zero errors. TT_SOAK_SECONDS sets the duration (default 30; an hour = 3600).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TwoTower;

my $secs = $ENV{TT_SOAK_SECONDS} || 30;
my $node = new_node('load', conf => ['max_connections = 50', "search_path = 'public, twotower'"]);
make_items($node, 'postgres', 'items', 20000, 16);
# A low fold threshold: the inserts of the load fold into the delta graph many times.
$node->safe_psql('postgres', 'CREATE INDEX items_idx ON items USING twotower_hnsw (v) WITH (fold_threshold = 100)');
# Each query during the load checks its own answer in one snapshot: the index's top 10 come in
# distance order, are rows of that snapshot, and are compared with exact search there.
$node->safe_psql('postgres', q{
	CREATE UNLOGGED TABLE checks (in_order bool, live bool, hits int, plan_ok bool);
	CREATE FUNCTION check_topk(qid bigint) RETURNS void LANGUAGE plpgsql AS $$
	DECLARE q real[]; r record; prev float8 := '-Infinity'; got bigint[] := '{}'; exact bigint[];
	        ordered bool := true; plan text := ''; line text;
	BEGIN
		SELECT v INTO q FROM items WHERE id = qid;
		IF q IS NULL THEN RETURN; END IF;
		PERFORM set_config('enable_seqscan', 'off', true);
		FOR line IN EXECUTE 'EXPLAIN (COSTS OFF) SELECT id FROM items WHERE category = 3 ORDER BY v <=> $1 LIMIT 10'
		   USING q LOOP
			plan := plan || line || E'\n';
		END LOOP;
		FOR r IN SELECT id, v <=> q AS d FROM items WHERE category = 3 ORDER BY v <=> q LIMIT 10 LOOP
			ordered := ordered AND r.d >= prev;
			prev := r.d;
			got := got || r.id;
		END LOOP;
		PERFORM set_config('enable_seqscan', 'on', true);
		PERFORM set_config('enable_indexscan', 'off', true);
		SELECT array_agg(id) INTO exact
		  FROM (SELECT id FROM items WHERE category = 3 ORDER BY v <=> q, id LIMIT 10) s;
		INSERT INTO checks VALUES (ordered,
			(SELECT count(*) FROM items WHERE id = ANY (got)) = cardinality(got),
			(SELECT count(*) FROM unnest(got) g WHERE g = ANY (exact)),
			plan LIKE '%Index Scan using items_idx%' OR plan LIKE '%Index Scan using %_ccnew%');
	END $$;
});

my $dir = PostgreSQL::Test::Utils::tempdir;
sub script { my ($name, $body) = @_; my $f = "$dir/$name.sql"; open(my $fh, '>', $f) or die; print $fh $body; close $fh; return $f; }
my $query = script('query', q{
\set id random(1, 20000)
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT check_topk(:id);
COMMIT;
});
my $insert = script('insert', q{
INSERT INTO items (category, v) SELECT 3, ARRAY(SELECT (random() * 2 - 1)::real FROM generate_series(1, 16));
});
my $delete = script('delete', q{
\set id random(1, 30000)
DELETE FROM items WHERE id = :id;
});
my $maint = script('maint', q{
VACUUM items;
REINDEX INDEX CONCURRENTLY items_idx;
\sleep 500 ms
});

my ($out1, $err1, $out2, $err2) = ('', '', '', '');
my $load = IPC::Run::start(
	[ 'pgbench', '-n', '-c', '4', '-j', '2', '-T', $secs, '-f', "$query\@6", '-f', "$insert\@2", '-f', "$delete\@1",
	  '-h', $node->host, '-p', $node->port, 'postgres' ],
	'>', \$out1, '2>', \$err1);
my $maintenance = IPC::Run::start(
	[ 'pgbench', '-n', '-c', '1', '-T', $secs, '-f', $maint, '-h', $node->host, '-p', $node->port, 'postgres' ],
	'>', \$out2, '2>', \$err2);
my $load_ok = $load->finish;
my $maint_ok = $maintenance->finish;
note($out1);
note($out2);
ok($load_ok, 'query/insert/delete load exited 0') or diag($err1);
ok($maint_ok, 'VACUUM / REINDEX CONCURRENTLY loop exited 0') or diag($err2);
like($out1, qr/number of failed transactions: 0/, 'no failed transactions under load');
like($out2, qr/number of transactions actually processed: [1-9]/, 'maintenance ran');
unlike($err1 . $err2, qr/ERROR|FATAL|PANIC/, 'no server errors reported to clients');

my ($n, $in_order, $live, $plan_ok, $recall) = split /\|/, $node->safe_psql('postgres',
	'SELECT count(*), count(*) FILTER (WHERE in_order), count(*) FILTER (WHERE live),
	        count(*) FILTER (WHERE plan_ok), round(avg(hits) / 10, 3) FROM checks');
cmp_ok($n, '>', 50, "$n queries checked their answers during the load");
is($in_order, $n, 'every answer during the load came in distance order');
is($live, $n, 'every answer held only rows of its snapshot');
is($plan_ok, $n, 'every checked query was an index scan');
cmp_ok($recall, '>=', 0.9, "recall@10 against exact search in the same snapshot: $recall");

is(index_scan_count($node, 'postgres', 'items', '<=>', 16), $node->safe_psql('postgres', 'SELECT count(*) FROM items'),
	'after the load, the index covers exactly the live rows');
# Scans that walk the delta chain while inserts extend the relation (a fresh index: an empty
# free space map, so each new delta page is a new block, linked from the tail a scan may be
# waiting to read). A scan that counted the blocks before the extension must not call the
# chain broken ("index is corrupt").
$node->safe_psql('postgres', q{
	CREATE TABLE grow (id bigserial PRIMARY KEY, v real[]);
	INSERT INTO grow (v) SELECT ARRAY(SELECT random()::real FROM generate_series(1, 64) WHERE g > 0)
	  FROM generate_series(1, 2000) g;
	CREATE INDEX grow_idx ON grow USING twotower_hnsw (v) WITH (fold_threshold = 10000000);
});
my $grow_insert = $node->basedir . '/grow_insert.sql';
my $grow_scan = $node->basedir . '/grow_scan.sql';
PostgreSQL::Test::Utils::append_to_file($grow_insert,
	"INSERT INTO grow (v) SELECT ARRAY(SELECT random()::real FROM generate_series(1, 64) WHERE g > 0) FROM generate_series(1, 20) g;\n");
PostgreSQL::Test::Utils::append_to_file($grow_scan,
	"SELECT id FROM grow ORDER BY v <=> ARRAY(SELECT random()::real FROM generate_series(1, 64))::real[] LIMIT 5;\n");
my ($gout, $gerr) = ('', '');
my $grow_ok = IPC::Run::run([ 'pgbench', '-n', '-c', '4', '-j', '2', '-T', '15', '-f', "$grow_insert\@1", '-f', "$grow_scan\@3",
	'-h', $node->host, '-p', $node->port, 'postgres' ], '>', \$gout, '2>', \$gerr);
ok($grow_ok, 'scans during relation-extending inserts exited 0') or diag($gerr);
unlike($gerr, qr/ERROR/, 'no scan found the growing delta chain broken');
cmp_ok($node->safe_psql('postgres', q{SELECT delta_items FROM twotower.index_info('grow_idx')}), '>', 2000,
	'the inserts went to the delta');

my $log = slurp_file($node->logfile);
unlike($log, qr/PANIC|TRAP|terminated by signal/, 'no backend crashed');
$node->stop;
done_testing();
