# Helpers shared by the cluster tests.
package TwoTower;
use strict;
use warnings;
use Exporter 'import';
use PostgreSQL::Test::Cluster;
our @EXPORT = qw(new_node make_items topk_signature exact_topk_signature topk_recall index_scan_count crash_all finish_killed_session kill_mid_statement);

# The one setup of every cluster test: a node named $name (init options in %$init, e.g.
# allows_streaming), extra postgresql.conf lines, started, with pg_twotower created in each
# database of @$dbs (default: postgres; other databases are created first).
sub new_node
{
	my ($name, %o) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(%{ $o{init} // {} });
	$node->append_conf('postgresql.conf',
		join("\n", "maintenance_work_mem = '512MB'", @{ $o{conf} // [] }));
	$node->start;
	for my $db (@{ $o{dbs} // ['postgres'] })
	{
		$node->safe_psql('postgres', "CREATE DATABASE $db") if $db ne 'postgres';
		$node->safe_psql($db, 'CREATE EXTENSION pg_twotower');
	}
	return $node;
}

# Dies unless the plan of $sql (run after $settings) is an index scan of a twotower_hnsw index:
# a check of index results that silently became a sequential scan would prove nothing.
sub assert_index_plan
{
	my ($node, $db, $settings, $sql) = @_;
	my $plan = $node->safe_psql($db, "$settings EXPLAIN (COSTS OFF) $sql");
	# The ordered scan: an index scan with an Order By line (other index scans, e.g. of the
	# primary key in a subquery, do not count).
	my @ordered = $plan =~ /Index Scan using (\S+) on \S+[^\n]*\n\s+Order By:/g;
	for my $idx (@ordered)
	{
		my $am = $node->safe_psql($db,
			"SELECT a.amname FROM pg_class c JOIN pg_am a ON a.oid = c.relam WHERE c.relname = '$idx'");
		return 1 if $am eq 'twotower_hnsw';
	}
	die "not an ordered scan of a twotower_hnsw index:\n$plan\n";
}

# Creates table $table with $n rows of $dims-dimensional random vectors (deterministic).
sub make_items
{
	my ($node, $db, $table, $n, $dims) = @_;
	$node->safe_psql($db, qq{
		SELECT setseed(0.3);
		CREATE TABLE $table (id bigserial PRIMARY KEY, category int, v real[]);
		INSERT INTO $table (category, v)
		SELECT i % 10, ARRAY(SELECT (random() * 2 - 1)::real FROM generate_series(1, $dims) WHERE i > 0)
		  FROM generate_series(1, $n) i;
	});
}

# The ids of the top $k neighbours of the vectors of rows @qids, through the index, as one string.
sub topk_signature
{
	my ($node, $db, $table, $op, $k, @qids) = @_;
	my $q = join(",", @qids);
	my $settings = 'SET enable_seqscan = off; SET enable_bitmapscan = off;';
	assert_index_plan($node, $db, $settings,
		"SELECT t.id FROM $table t ORDER BY t.v $op (SELECT v FROM $table WHERE id = $qids[0]) LIMIT $k");
	return _topk($node, $db, $settings, $table, $op, $k, $q);
}

# The same through exact search (no index), to compare index results with.
sub exact_topk_signature
{
	my ($node, $db, $table, $op, $k, @qids) = @_;
	my $q = join(",", @qids);
	return _topk($node, $db, 'SET enable_indexscan = off; SET enable_bitmapscan = off; SET enable_seqscan = on;',
		$table, $op, $k, $q);
}

# Fraction of the exact top $k (over queries @qids) that the index returns, its plan asserted.
sub topk_recall
{
	my ($node, $db, $table, $op, $k, @qids) = @_;
	my @got = split / /, topk_signature($node, $db, $table, $op, $k, @qids);
	my @want = split / /, exact_topk_signature($node, $db, $table, $op, $k, @qids);
	my ($hit, $all) = (0, 0);
	for my $i (0 .. $#want)
	{
		my %g = map { $_ => 1 } split /,/, ($got[$i] // '');
		for my $id (split /,/, $want[$i]) { $all++; $hit++ if $g{$id}; }
	}
	return $all ? $hit / $all : 0;
}

sub _topk
{
	my ($node, $db, $settings, $table, $op, $k, $q) = @_;
	return $node->safe_psql($db, qq{
		$settings
		SELECT string_agg(r, ' ' ORDER BY qid) FROM (
		  SELECT q.id AS qid,
		         (SELECT string_agg(id::text, ',')
		            FROM (SELECT t.id FROM $table t ORDER BY t.v $op q.v LIMIT $k) s) AS r
		    FROM $table q WHERE q.id IN ($q)) x;
	});
}

# How many rows a full ordered index scan returns (relaxed order and no row cap: every live
# row once).
sub index_scan_count
{
	my ($node, $db, $table, $op, $dims) = @_;
	my $settings = 'SET enable_seqscan = off; SET enable_bitmapscan = off;
		SET twotower.iterative_scan = relaxed_order; SET twotower.max_scan_tuples = 2147483647;';
	my $scan = "SELECT id FROM $table ORDER BY v $op array_fill(0.5::real, ARRAY[$dims]) LIMIT 100000000";
	assert_index_plan($node, $db, $settings, $scan);
	return $node->safe_psql($db, "$settings SELECT count(*) FROM ($scan) s;");
}

# A hard crash: SIGKILL to the postmaster and every one of its processes at once (a postmaster
# killed alone leaves busy backends running until they finish their statement).
sub crash_all
{
	my ($node) = @_;
	my $pm = $node->{_pid} or die 'node is not running';
	my @children = grep { /^\d+$/ } split /\s+/, `ps -o pid= --ppid $pm`;
	kill 'KILL', $pm, @children;
	$node->{_pid} = undef;
	# Wait until every killed process is gone (shared memory detached).
	for (1 .. 100)
	{
		last unless grep { kill 0, $_ } ($pm, @children);
		select(undef, undef, undef, 0.1);
	}
}

# Waits for a background psql session whose server was killed to exit; returns its stderr
# (writing \q to a session that already lost its server would die before collecting it).
sub finish_killed_session
{
	my ($bg) = @_;
	eval { $bg->{run}->finish };
	return $bg->{stderr};
}

# crash_all while background session $bg runs a statement, then checks that the statement was
# killed mid-way (its session lost the server) and had raised no error before ($what names it).
sub kill_mid_statement
{
	my ($node, $bg, $what) = @_;
	crash_all($node);
	my $stderr = finish_killed_session($bg);
	Test::More::like($stderr, qr/server closed the connection unexpectedly|connection to server was lost|terminating connection/,
		"$what was killed mid-statement (its session lost the server)");
	Test::More::unlike($stderr, qr/ERROR/, "$what had raised no error before the kill");
}

1;
