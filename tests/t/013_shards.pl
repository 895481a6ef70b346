# Shards over postgres_fdw: a coordinator whose partitioned item table has a local partition
# and two foreign partitions on two other clusters. recall() over its index equals the merge of
# each shard's own top k (exactly), the exclusions reach the shards, the plain ORDER BY ... LIMIT
# through the partitioned table gives the same items, a cancel and statement_timeout reach the
# shards, and a shard that is down is a clear error.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);
use TwoTower;

my @shards = map { new_node("shard$_") } (1, 2);
my $coord = new_node('coord');

# Each shard: its range of item ids, deterministic vectors, its own index.
for my $i (0, 1)
{
	my ($lo, $hi) = (1001 + $i * 1000, 2000 + $i * 1000);
	$shards[$i]->safe_psql('postgres', qq{
		CREATE TABLE items (id bigint PRIMARY KEY, embedding real[]);
		INSERT INTO items SELECT g, ARRAY[sin(g * 0.37), cos(g * 0.53), sin(g * 0.91) * cos(g * 0.11), cos(g * 0.07)]::real[]
		  FROM generate_series($lo, $hi) g;
		CREATE INDEX items_idx ON items USING twotower_hnsw (embedding real_l2_ops);
		-- A shard's slow search, for the cancel test (only called by name).
		CREATE FUNCTION slow() RETURNS void LANGUAGE sql AS 'SELECT pg_sleep(30)';
	});
}

my $servers = '';
for my $i (0, 1)
{
	my ($n, $port, $host) = ($i + 1, $shards[$i]->port, $shards[$i]->host);
	$servers .= qq{
		CREATE SERVER s$n FOREIGN DATA WRAPPER postgres_fdw
		  OPTIONS (host '$host', port '$port', dbname 'postgres', extensions 'pg_twotower', async_capable 'true');
		CREATE USER MAPPING FOR CURRENT_USER SERVER s$n;
		CREATE FOREIGN TABLE items_s$n PARTITION OF items FOR VALUES FROM (@{[1001 + $i * 1000]}) TO (@{[2001 + $i * 1000]})
		  SERVER s$n OPTIONS (table_name 'items');
	};
}
$coord->safe_psql('postgres', qq{
	CREATE EXTENSION postgres_fdw;
	CREATE FUNCTION st(h text, d bytea) RETURNS bytea LANGUAGE sql AS \$\$
	    SELECT set_byte(set_byte('\\x0000000000000000'::bytea, 0, length(convert_to(h, 'UTF8')) % 256), 1,
	                    length(convert_to(h, 'UTF8')) / 256) || convert_to(h, 'UTF8') || d \$\$;
	SELECT twotower.import_model('u', '{"format": "pg_twotower.tower", "spec_version": 1, "kind": "user",
	  "features": [{"name": "q", "type": "dense", "dim": 4}], "layers": [], "output": {"dim": 4, "metric": "l2"}}',
	  st('{}', ''));
	CREATE TABLE items (id bigint, embedding real[]) PARTITION BY RANGE (id);
	CREATE TABLE items_local PARTITION OF items FOR VALUES FROM (1) TO (1001);
	ALTER TABLE items_local ADD PRIMARY KEY (id);
	INSERT INTO items_local SELECT g, ARRAY[sin(g * 0.37), cos(g * 0.53), sin(g * 0.91) * cos(g * 0.11), cos(g * 0.07)]::real[]
	  FROM generate_series(1, 1000) g;
	$servers
	CREATE INDEX items_idx ON items USING twotower_hnsw (embedding real_l2_ops);
});
my $q = '[0.2, 0.4, -0.1, 0.5]';
my $qv = "'{0.2,0.4,-0.1,0.5}'::real[]";

# Each node's own exact top k (no index: a sequential scan and a sort), merged, is the
# reference; @nodes: the nodes that count (default: all).
sub merged_reference
{
	my ($k, $exclude, @nodes) = @_;
	@nodes = ($coord, @shards) unless @nodes;
	my @rows;
	my $where = $exclude ? "WHERE id <> ALL ('{$exclude}'::bigint[])" : '';
	for my $node (@nodes)
	{
		my $table = $node == $coord ? 'items_local' : 'items';
		push @rows, split /\n/, $node->safe_psql('postgres', qq{
			SET enable_indexscan = off; SET enable_bitmapscan = off;
			SELECT id || ' ' || (embedding OPERATOR(public.<->) $qv) FROM $table $where
			 ORDER BY embedding OPERATOR(public.<->) $qv, id LIMIT $k});
	}
	my @sorted = sort { (split / /, $a)[1] <=> (split / /, $b)[1] || (split / /, $a)[0] <=> (split / /, $b)[0] } @rows;
	return join(',', map { (split / /, $_)[0] } @sorted[0 .. $k - 1]);
}

my $recall = sub {
	my ($k, $exclude) = @_;
	my $ex = $exclude ? ", '{$exclude}'::bigint[]" : '';
	return $coord->safe_psql('postgres', qq{
		SET twotower.ef_search = 400;
		SELECT string_agg(item_id::text, ',' ORDER BY rank) FROM twotower.recall('u', 'items_idx', '{"q": $q}', $k$ex)});
};

my $ref = merged_reference(20);
is($recall->(20), $ref, 'recall over a local partition and two shards = the merge of their own top 20');
my @top = split /,/, $ref;
ok((grep { $_ > 1000 } @top) && (grep { $_ <= 1000 } @top), 'the top 20 mixes local and shard items');
my $ex = join(',', @top[0 .. 4]);
is($recall->(20, $ex), merged_reference(20, $ex), 'exclusions reach the shards');
is($recall->(200), merged_reference(200), 'k 200: more than a shard returns at once');

# recommend(): a pipeline whose two-tower channel is the partitioned index, and whose stage
# reads the candidates' vectors through the partitioned table (from the shards).
$coord->safe_psql('postgres', q{SELECT twotower.save_pipeline('f', '{"user_model": "u", "vectors": {"table": "items"},
	"channels": [{"type": "twotower", "index": "items_idx", "k": 40}],
	"stages": [{"type": "twotower", "keep": 20}], "k": 20}')});
is($coord->safe_psql('postgres', qq{SET twotower.ef_search = 400;
	SELECT string_agg(item_id::text, ',' ORDER BY rank) FROM twotower.recommend('f', '{"q": $q}')}),
	$ref, 'recommend over the shards: the same top 20 as recall');

# The shards get the ORDER BY and LIMIT (pg_twotower is in the servers' extensions).
my $plan = $coord->safe_psql('postgres', qq{EXPLAIN (VERBOSE, COSTS OFF)
	SELECT id FROM items_s1 ORDER BY embedding OPERATOR(public.<->) $qv LIMIT 10});
like($plan, qr/Remote SQL:.*ORDER BY.*LIMIT/s, 'ORDER BY and LIMIT are shipped to a shard');
# The plain SQL path through the partitioned table gives the same items as recall().
is($coord->safe_psql('postgres', qq{SET twotower.ef_search = 400;
	SELECT string_agg(id::text, ',') FROM (SELECT id FROM items ORDER BY embedding OPERATOR(public.<->) $qv LIMIT 20) s}),
	$ref, 'ORDER BY ... LIMIT through the partitioned table: the same top 20');

# A new item on a shard is found at once.
$shards[1]->safe_psql('postgres', "INSERT INTO items VALUES (2500, '{0.2,0.4,-0.1,0.5}') ON CONFLICT (id) DO UPDATE SET embedding = EXCLUDED.embedding");
like($recall->(3), qr/^2500,/, 'a vector written on a shard is found by the coordinator');

# statement_timeout and a cancel reach the shards: a shard that does not answer (its backend
# holds a lock the shard's query waits for) makes the coordinator's call end at the timeout,
# and the shard's query goes away.
my $blocker = $shards[0]->background_psql('postgres');
$blocker->query_safe('BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE');
my $waiting_sql = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%items%'";
my ($o, $e) = ('', '');
my $h = IPC::Run::start(
	[ 'psql', '-XAtq', '-d', $coord->connstr('postgres'), '-c',
	  qq{SET statement_timeout = '10s'; SELECT count(*) FROM twotower.recall('u', 'items_idx', '{"q": $q}', 10)} ],
	'>', \$o, '2>', \$e);
# (Polls until a deadline; the call's 10 s timeout leaves a loaded machine time to see it wait.)
my $waiting = '0';
my $deadline = time + 30;
while (time < $deadline)
{
	$waiting = $shards[0]->safe_psql('postgres', $waiting_sql);
	last if $waiting ne '0';
	sleep 0.05;
}
is($waiting, '1', "the coordinator's call waits on the shard");
$h->finish;
like($e, qr/canceling statement due to statement timeout/, 'statement_timeout ends a call waiting on a shard');
# The blocker holds its lock until the ROLLBACK below: the shard's query goes away only if the
# cancel reached it.
$deadline = time + 30;
while (time < $deadline)
{
	$waiting = $shards[0]->safe_psql('postgres', $waiting_sql);
	last if $waiting eq '0';
	sleep 0.1;
}
is($waiting, '0', "the shard's query was cancelled too");
$blocker->query_safe('ROLLBACK');
$blocker->quit;

# A shard that is down: a clear error naming the connection, not a wrong answer.
$shards[1]->stop;
my ($ret, $out, $err) = $coord->psql('postgres', qq{SELECT count(*) FROM twotower.recall('u', 'items_idx', '{"q": $q}', 10)});
isnt($ret, 0, 'a shard down: the call fails');
like($err, qr/could not connect to server "s2"|connection to server .* failed/, 'the error names the unreachable shard');
# With twotower.unavailable_shards = skip: the other leaves' items, and a WARNING naming the
# shard that did not answer.
($ret, $out, $err) = $coord->psql('postgres', qq{SET twotower.ef_search = 400; SET twotower.unavailable_shards = skip;
	SELECT string_agg(item_id::text, ',' ORDER BY rank) FROM twotower.recall('u', 'items_idx', '{"q": $q}', 20)});
is($ret, 0, 'skip: the call succeeds');
like($err, qr/WARNING:.*left out 1 of 2 foreign partitions.*items_s2/, 'skip: a WARNING names the shard');
my @partial = split /,/, $out;
is(scalar(@partial), 20, 'skip: k items');
ok(!(grep { $_ > 2000 } @partial), "skip: none of the missing shard's items");
my @without = split /,/, merged_reference(20, undef, $coord, $shards[0]);
is($out, join(',', @without[0 .. 19]), 'skip: exactly the merge of the nodes that answered');
# twotower.fanout_report(), in the session of the call: which shard answered, which did not.
my $report_sql = q{SELECT string_agg(format('%s %s %s %s %s', partition, server, answered, items, error IS NOT NULL), ';'
	ORDER BY partition) FROM twotower.fanout_report()};
($ret, $out, $err) = $coord->psql('postgres', qq{SET twotower.unavailable_shards = skip;
	SELECT count(*) FROM twotower.recall('u', 'items_idx', '{"q": $q}', 20); $report_sql});
is($out, "20\npublic.items_s1 s1 t 20 f;public.items_s2 s2 f 0 t", 'fanout_report: the shard that answered and the one that did not');
is($coord->safe_psql('postgres', 'SELECT count(*) FROM twotower.fanout_report()'), '0', 'fanout_report: empty before a fan-out');
# A statement_timeout still ends the call in skip mode (it is not a shard failure).
$shards[1]->start;
my $blocker2 = $shards[1]->background_psql('postgres');
$blocker2->query_safe('BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE');
($ret, $out, $err) = $coord->psql('postgres', qq{SET twotower.unavailable_shards = skip; SET statement_timeout = '1s';
	SELECT count(*) FROM twotower.recall('u', 'items_idx', '{"q": $q}', 10)});
like($err, qr/canceling statement due to statement timeout/, 'skip: statement_timeout still ends the call');
$blocker2->query_safe('ROLLBACK');
$blocker2->quit;
is($recall->(20), merged_reference(20), 'the shard back: the same answer as before');
is($coord->safe_psql('postgres', qq{SELECT count(*) FROM twotower.recall('u', 'items_idx', '{"q": $q}', 20);
	SELECT bool_and(answered AND items = 20 AND ms > 0 AND error IS NULL), count(*) FROM twotower.fanout_report()}),
	"20\nt|2", 'fanout_report: both shards answered, with their time');

# A role that is not a superuser: as with postgres_fdw, its user mapping must carry a password,
# and the shard must ask for it (these shards trust local connections: refused). (It may run
# the model: a model runs only for its owner, twotower_admin and the roles granted its usage.)
$coord->safe_psql('postgres', q{
	CREATE ROLE app LOGIN;
	SELECT twotower.grant_model_usage('u', 'app');
	GRANT SELECT ON items, items_s1, items_s2, items_local TO app;
	GRANT USAGE ON FOREIGN SERVER s1, s2 TO app;
	CREATE USER MAPPING FOR app SERVER s1;
	CREATE USER MAPPING FOR app SERVER s2;
});
($ret, $out, $err) = $coord->psql('postgres', qq{SET ROLE app; SELECT count(*) FROM twotower.recall('u', 'items_idx', '{"q": $q}', 10)});
like($err, qr/could not connect to server "s1".*password in the user mapping/s, 'a non-superuser without a password in its mapping is refused');
$coord->safe_psql('postgres', q{ALTER USER MAPPING FOR app SERVER s1 OPTIONS (ADD password 'secret');
	ALTER USER MAPPING FOR app SERVER s2 OPTIONS (ADD password 'secret')});
($ret, $out, $err) = $coord->psql('postgres', qq{SET ROLE app; SELECT count(*) FROM twotower.recall('u', 'items_idx', '{"q": $q}', 10)});
like($err, qr/did not ask for the password/, "a password the shard does not ask for is refused (the server's own identity is not lent)");

# The shards ask app for its password: app's calls go through, with SELECT on the partitioned
# table only (as in a query of it), its grants on the foreign partitions revoked.
for my $shard (@shards)
{
	$shard->safe_psql('postgres', q{SET password_encryption = 'scram-sha-256';
		CREATE ROLE app LOGIN PASSWORD 'secret'; GRANT SELECT ON items TO app});
	my $hba = $shard->data_dir . '/pg_hba.conf';
	my $rules = slurp_file($hba);
	open my $fh, '>', $hba or die "$hba: $!";
	print $fh "local all app scram-sha-256\nhost all app 127.0.0.1/32 scram-sha-256\n$rules";
	close $fh;
	$shard->reload;
}
$coord->safe_psql('postgres', q{REVOKE SELECT ON items_s1, items_s2 FROM app;
	ALTER USER MAPPING FOR app SERVER s1 OPTIONS (ADD user 'app');
	ALTER USER MAPPING FOR app SERVER s2 OPTIONS (ADD user 'app')});
is($coord->safe_psql('postgres', qq{SET ROLE app; SET twotower.ef_search = 400;
	SELECT string_agg(item_id::text, ',' ORDER BY rank) FROM twotower.recall('u', 'items_idx', '{"q": $q}', 20)}),
	merged_reference(20), 'a non-superuser whose password the shards ask for gets the same answer');
($ret, $out, $err) = $coord->psql('postgres', qq{SET ROLE app; SET twotower.shard_protocol = postgres_fdw;
	SELECT count(*) FROM twotower.recall('u', 'items_idx', '{"q": $q}', 20)});
like($err, qr/permission denied for foreign table items_s1/, 'through postgres_fdw, each foreign partition needs its own grant');

# The same answers through postgres_fdw's statement path (twotower.shard_protocol).
$coord->safe_psql('postgres', 'ALTER DATABASE postgres SET twotower.shard_protocol = postgres_fdw');
is($recall->(20), merged_reference(20), 'postgres_fdw path: the merge of the top 20');
is($recall->(20, $ex), merged_reference(20, $ex), 'postgres_fdw path: exclusions');
$shards[1]->stop;
($ret, $out, $err) = $coord->psql('postgres', qq{SET twotower.ef_search = 400; SET twotower.unavailable_shards = skip;
	SELECT string_agg(item_id::text, ',' ORDER BY rank) FROM twotower.recall('u', 'items_idx', '{"q": $q}', 20)});
like($err, qr/WARNING:.*left out 1 of 2 foreign partitions.*items_s2/, 'postgres_fdw path, skip: a WARNING names the shard');
is($out, join(',', @without[0 .. 19]), 'postgres_fdw path, skip: the merge of the nodes that answered');
($ret, $out, $err) = $coord->psql('postgres', qq{SET twotower.unavailable_shards = skip;
	SELECT count(*) FROM twotower.recall('u', 'items_idx', '{"q": $q}', 20); $report_sql});
is($out, "20\npublic.items_s1 s1 t 20 f;public.items_s2 s2 f 0 t", 'postgres_fdw path: fanout_report names the shard left out');
$shards[1]->start;
$coord->safe_psql('postgres', 'ALTER DATABASE postgres RESET twotower.shard_protocol');

# Two partitions on one server: two connections (one statement at a time each), reused by the
# next calls, not one more per call.
$shards[0]->safe_psql('postgres', q{
	CREATE TABLE items_extra (id bigint PRIMARY KEY, embedding real[]);
	INSERT INTO items_extra VALUES (3001, '{0.2,0.4,-0.1,0.5}'), (3002, '{9,9,9,9}');
	CREATE INDEX ON items_extra USING twotower_hnsw (embedding real_l2_ops);
});
# A session that has searched the table before the partition is added (its cached list of
# shards must not hide the new one).
my $bg = $coord->background_psql('postgres');
unlike($bg->query_safe(qq{SELECT string_agg(item_id::text, ',' ORDER BY rank) FROM twotower.recall('u', 'items_idx', '{"q": $q}', 3)}),
	qr/3001/, 'before the partition is added: not found');
$coord->safe_psql('postgres', q{CREATE FOREIGN TABLE items_s1b PARTITION OF items FOR VALUES FROM (3001) TO (3101)
	SERVER s1 OPTIONS (table_name 'items_extra')});
my $top = '';
$top = $bg->query_safe(qq{SELECT string_agg(item_id::text, ',' ORDER BY rank) FROM twotower.recall('u', 'items_idx', '{"q": $q}', 3)}) for 1 .. 5;
like($top, qr/^2500,3001,/, 'a second partition on the same server is searched (3001 ties with 2500 at distance 0: ids order ties)');
# (Connections of sessions that ended above may take a moment to go away.)
my $conns = '';
$deadline = time + 30;
while (time < $deadline)
{
	$conns = $shards[0]->safe_psql('postgres', "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg_twotower'");
	last if $conns eq '2';
	sleep 0.1;
}
is($conns, '2', 'two connections to that server after five calls');
$bg->quit;

# A shard host that accepts the TCP connection and never answers: the connect does not block
# the backend. statement_timeout ends the call; the server's connect_timeout ends the connect.
use IO::Socket::INET;
my $mute = IO::Socket::INET->new(Listen => 5, LocalAddr => '127.0.0.1', LocalPort => 0, Proto => 'tcp') or die "listen: $!";
my $mute_port = $mute->sockport;
$coord->safe_psql('postgres', qq{
	CREATE SERVER mute FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '127.0.0.1', port '$mute_port', dbname 'postgres');
	CREATE USER MAPPING FOR CURRENT_USER SERVER mute;
	CREATE TABLE hung (id bigint, embedding real[]) PARTITION BY RANGE (id);
	CREATE TABLE hung_local PARTITION OF hung FOR VALUES FROM (1) TO (1001);
	ALTER TABLE hung_local ADD PRIMARY KEY (id);
	INSERT INTO hung_local SELECT id, embedding FROM items_local;
	CREATE FOREIGN TABLE hung_remote PARTITION OF hung FOR VALUES FROM (1001) TO (2001) SERVER mute OPTIONS (table_name 'items');
	CREATE INDEX hung_idx ON hung USING twotower_hnsw (embedding real_l2_ops);
});
# The call's duration on the server's clock, in its own session (not psql's start-up): a connect
# that blocked the backend would never end (the host never answers), so 10 s is a generous bound.
my $timed = sub {
	my ($settings) = @_;
	my ($r, $o, $e) = $coord->psql('postgres', qq{SELECT clock_timestamp() AS t0 \\gset
		$settings
		SELECT count(*) FROM twotower.recall('u', 'hung_idx', '{"q": $q}', 10);
		RESET ALL;
		SELECT round(extract(epoch FROM clock_timestamp() - :'t0')::numeric, 3)}, on_error_stop => 0);
	my @lines = split /\n/, $o;
	return ($lines[-1], join("\n", @lines[0 .. $#lines - 1]), $e);
};
my $secs;
($secs, $out, $err) = $timed->(q{SET statement_timeout = '1s';});
like($err, qr/canceling statement due to statement timeout/, 'a shard that never answers the connect: statement_timeout ends the call');
cmp_ok($secs, '<', 10, "within the timeout (not blocked in the connect): $secs s on the server's clock");
$coord->safe_psql('postgres', q{ALTER SERVER mute OPTIONS (ADD connect_timeout '2')});
($secs, $out, $err) = $timed->(q{SET twotower.unavailable_shards = skip;});
is($out, '10', "connect_timeout: skip mode answers from the local partition");
like($err, qr/WARNING:.*hung_remote.*timeout expired/, 'connect_timeout: the WARNING says the connect timed out');
cmp_ok($secs, '<', 10, "after the connect_timeout (2 s): $secs s on the server's clock");
close $mute;

done_testing();
