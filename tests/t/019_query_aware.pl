# A query-aware index (WITH (query_sample = ...)) is a build like any other: it survives a crash,
# reaches a streaming replica, is rebuilt tuned by a restore; its build shows a tuning phase in
# pg_stat_progress_create_index and stops soon after a cancel; two builds on one thread are
# identical (the tuning is deterministic).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use TwoTower;

my $primary = new_node('qa_primary', init => { allows_streaming => 1 }, conf => ["maintenance_work_mem = '1GB'"]);
make_items($primary, 'postgres', 'items', 6000, 16);
# Users between the items: means of six random items (out-of-distribution queries).
$primary->safe_psql('postgres', q{
	SELECT setseed(0.7);
	CREATE TABLE users (id int PRIMARY KEY, v real[]);
	INSERT INTO users
	SELECT u, (SELECT array_agg(s ORDER BY j) FROM (
	             SELECT j, avg(it.v[j])::real AS s
	               FROM generate_series(1, 16) j,
	                    (SELECT v FROM items WHERE id IN (SELECT (random() * 5999)::int + 1 + u * 0 FROM generate_series(1, 6))) it
	              GROUP BY j) x)
	  FROM generate_series(1, 400) u;
});
my $opts = q{m = 6, ef_construction = 12, query_sample = 'SELECT v FROM public.users WHERE id % 2 = 0 ORDER BY id',
	query_k = 20, query_ef = 20, query_extra = 8};
my $info = q{SELECT tuned_queries, tuned_k, tuned_links, tuned_recall_after FROM twotower.index_info('items_idx')};
# The index's top 20 of the users (the sample's and the others'), as one string.
my $signature = q{
	SET enable_seqscan = off; SET enable_bitmapscan = off; SET twotower.ef_search = 20;
	SELECT string_agg(r, ' ' ORDER BY uid) FROM (
	  SELECT u.id AS uid, (SELECT string_agg(id::text, ',') FROM
	      (SELECT t.id FROM items t ORDER BY t.v OPERATOR(public.<=>) u.v LIMIT 20) s) AS r
	    FROM users u) x};
my $exact = q{
	SET enable_indexscan = off; SET enable_bitmapscan = off;
	SELECT string_agg(r, ' ' ORDER BY uid) FROM (
	  SELECT u.id AS uid, (SELECT string_agg(id::text, ',') FROM
	      (SELECT t.id FROM items t ORDER BY t.v OPERATOR(public.<=>) u.v, t.id LIMIT 20) s) AS r
	    FROM users u WHERE u.id % 2 = 0) x};

# Deterministic: two builds on one thread give the same tuning and the same answers.
$primary->safe_psql('postgres', qq{SET twotower.build_threads = 1;
	CREATE INDEX items_idx ON items USING twotower_hnsw (v real_cosine_ops) WITH ($opts)});
my $first_info = $primary->safe_psql('postgres', $info);
like($first_info, qr/^200\|20\|\d+\|1$/, "the build tuned the graph to the 200 sample users ($first_info)");
my $first = $primary->safe_psql('postgres', $signature);
$primary->safe_psql('postgres', 'SET twotower.build_threads = 1; REINDEX INDEX items_idx');
is($primary->safe_psql('postgres', $info), $first_info, 'a second build on one thread tunes the same');
is($primary->safe_psql('postgres', $signature), $first, 'and answers the same');
# The sample's users get their exact top 20 (the even users' part of the signature).
my %by_user = do { my $i = 0; map { ++$i => $_ } split / /, $first };
my $even = join(' ', map { $by_user{$_} } grep { $_ % 2 == 0 } sort { $a <=> $b } keys %by_user);
my $want = $primary->safe_psql('postgres', $exact);
my ($same, $all) = (0, 0);
my @w = split / /, $want;
my @g = split / /, $even;
for my $i (0 .. $#w) { $all++; $same++ if join(',', sort split /,/, $w[$i]) eq join(',', sort split /,/, $g[$i] // ''); }
is($same, $all, "every sample user's index top 20 is its exact top 20 ($same of $all)");

# A streaming replica: the tuned graph arrives with the WAL, answers the same.
$primary->backup('qa_b1');
my $standby = PostgreSQL::Test::Cluster->new('qa_standby');
$standby->init_from_backup($primary, 'qa_b1', has_streaming => 1);
$standby->start;
$primary->safe_psql('postgres', 'REINDEX INDEX CONCURRENTLY items_idx');
$primary->wait_for_catchup($standby);
my $pinfo = $primary->safe_psql('postgres', $info);
like($pinfo, qr/^200\|20\|\d+\|/, 'REINDEX CONCURRENTLY tuned again');
is($standby->safe_psql('postgres', $info), $pinfo, 'the standby shows the same tuning');
is($standby->safe_psql('postgres', $signature), $primary->safe_psql('postgres', $signature),
	'the standby answers as the primary');

# A crash right after the build committed: the tuned index is there after recovery.
$primary->safe_psql('postgres', qq{DROP INDEX items_idx; SET twotower.build_threads = 1;
	CREATE INDEX items_idx ON items USING twotower_hnsw (v real_cosine_ops) WITH ($opts)});
my $before = $primary->safe_psql('postgres', $signature);
is($before, $first, 'rebuilt on one thread: the same answers again');
crash_all($primary);
$primary->start;
is($primary->safe_psql('postgres', $info), $first_info, 'after a crash: the tuning is there');
is($primary->safe_psql('postgres', $signature), $before, 'after a crash: the same answers');
$primary->wait_for_catchup($standby);
is($standby->safe_psql('postgres', $signature), $before, 'and the standby too');
$standby->stop;

# pg_dump / restore: the restore's CREATE INDEX carries the options and tunes again.
my $dump = $primary->basedir . '/qa.dump';
$primary->command_ok([ 'pg_dump', '-Fc', '-f', $dump, '-d', $primary->connstr('postgres') ], 'pg_dump');
$primary->safe_psql('postgres', 'CREATE DATABASE restored');
$primary->command_ok([ 'pg_restore', '-d', $primary->connstr('restored'), $dump ], 'pg_restore');
like($primary->safe_psql('restored', $info), qr/^200\|20\|\d+\|/, 'the restored index is tuned');
like($primary->safe_psql('restored', q{SELECT reloptions::text FROM pg_class WHERE relname = 'items_idx'}),
	qr/query_sample=SELECT v FROM public.users/, 'with its options');
is($primary->safe_psql('restored', $exact), $want, 'the restored rows give the same exact answers');
my $rsig = $primary->safe_psql('restored', $signature);
my %r = do { my $i = 0; map { ++$i => $_ } split / /, $rsig };
my @rg = map { $r{$_} } grep { $_ % 2 == 0 } sort { $a <=> $b } keys %r;
($same, $all) = (0, 0);
for my $i (0 .. $#w) { $all++; $same++ if join(',', sort split /,/, $w[$i]) eq join(',', sort split /,/, $rg[$i] // ''); }
is($same, $all, "the restored index gives every sample user its exact top 20 ($same of $all)");

# A sample whose names need the search_path fails the restore (pg_restore runs with an empty
# one), and the error says so.
$primary->safe_psql('postgres', q{CREATE TABLE items2 AS SELECT * FROM items WHERE id <= 500;
	CREATE INDEX items2_idx ON items2 USING twotower_hnsw (v real_cosine_ops) WITH (query_sample = 'SELECT v FROM users', query_k = 5)});
my $dump2 = $primary->basedir . '/qa2.dump';
$primary->command_ok([ 'pg_dump', '-Fc', '-t', 'items2', '-t', 'users', '-f', $dump2, '-d', $primary->connstr('postgres') ], 'pg_dump of an unqualified sample');
$primary->safe_psql('postgres', 'CREATE DATABASE restored2');
$primary->safe_psql('restored2', 'CREATE EXTENSION pg_twotower');
my ($rret, $rout, $rerr) = (0, '', '');
IPC::Run::run([ 'pg_restore', '-d', $primary->connstr('restored2'), $dump2 ], '>', \$rout, '2>', \$rerr);
like($rerr, qr/relation "users" does not exist/, 'its restore cannot resolve the sample');
like($rerr, qr/schema-qualify the names/, 'and the error says to schema-qualify them');
$primary->safe_psql('postgres', 'DROP TABLE items2');

# Progress and cancel: a large sample keeps the build in its tuning phase; a cancel stops it
# soon (within a second on an idle machine; checked against 10 s, as the build's cancel is).
make_items($primary, 'postgres', 'big', 30000, 32);
my $bg = $primary->background_psql('postgres', on_error_stop => 0);
$bg->query_until(qr/started/, "\\echo started\nSET twotower.build_threads = 1;\n"
	. "CREATE INDEX big_idx ON big USING twotower_hnsw (v real_l2_ops) WITH (query_sample = 'SELECT v FROM big', query_limit = 30000, query_k = 200);\n");
ok($primary->poll_query_until('postgres', q{
	SELECT count(*) = 1 FROM pg_stat_progress_create_index WHERE phase = 'building index: tuning graph to sample queries' AND tuples_total = 30000}),
	'progress shows the tuning phase with the sample size as its total');
my $log_at = -s $primary->logfile;
my $t0 = $primary->safe_psql('postgres',
	q{SELECT extract(epoch FROM clock_timestamp()) FROM pg_stat_progress_create_index, pg_cancel_backend(pid)});
ok($primary->poll_query_until('postgres', 'SELECT count(*) = 0 FROM pg_stat_progress_create_index'), 'the tuning stopped');
eval { $bg->quit };
my ($stamp) = substr(slurp_file($primary->logfile), $log_at) =~ /^(\d{4}-\d\d-\d\d [\d:.]+ \w+) \[\d+\] .*ERROR:  canceling statement due to user request/m;
ok(defined $stamp, 'the tuning logged its cancellation');
my $elapsed = $primary->safe_psql('postgres', qq{SELECT extract(epoch FROM '$stamp'::timestamptz) - $t0});
cmp_ok($elapsed, '<', 10, sprintf('the tuning stopped %.3f s after the cancel request (server clock)', $elapsed));
is($primary->safe_psql('postgres', "SELECT count(*) FROM pg_class WHERE relname = 'big_idx'"), '0', 'no index left behind');
# statement_timeout stops it the same way.
my ($ret, $out, $err) = $primary->psql('postgres', q{SET statement_timeout = '3s'; SET twotower.build_threads = 1;
	CREATE INDEX big_idx ON big USING twotower_hnsw (v real_l2_ops) WITH (query_sample = 'SELECT v FROM big', query_limit = 30000, query_k = 200)});
like($err, qr/canceling statement due to statement timeout/, 'statement_timeout stops a tuning build');

$primary->stop;
done_testing();
