# Helpers shared by the cluster tests.
package TwoTower;
use strict;
use warnings;
use Exporter 'import';
our @EXPORT = qw(make_items topk_signature index_scan_count crash_all);

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
	return $node->safe_psql($db, qq{
		SET enable_seqscan = off; SET enable_bitmapscan = off;
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
	return $node->safe_psql($db, qq{
		SET enable_seqscan = off; SET enable_bitmapscan = off;
		SET twotower.iterative_scan = relaxed_order; SET twotower.max_scan_tuples = 2147483647;
		SELECT count(*) FROM (SELECT id FROM $table
		  ORDER BY v $op array_fill(0.5::real, ARRAY[$dims]) LIMIT 100000000) s;
	});
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

1;
