# A build reports progress in pg_stat_progress_create_index and stops within a second of a cancel
# request; a build over the memory budget stops with SQLSTATE 53200.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use TwoTower;

my $node = new_node('cancel', conf => ["maintenance_work_mem = '1GB'"]);
make_items($node, 'postgres', 'items', 150000, 32);

my $bg = $node->background_psql('postgres', on_error_stop => 0);
$bg->query_until(qr/started/, "\\echo started\nSET twotower.build_threads = 1;\nCREATE INDEX items_idx ON items USING twotower_hnsw (v);\n");
ok($node->poll_query_until('postgres', q{
	SELECT tuples_done > 1000 AND tuples_total >= tuples_done
	  FROM pg_stat_progress_create_index WHERE phase = 'building index: building HNSW graph'}),
	'progress shows the graph phase with tuples_done / tuples_total');
# Server-side latency: from the server's clock at the cancel request to the timestamp of the
# build's cancellation message in the log (not psql start-up or polling).
my $log_at = -s $node->logfile;
my $t0 = $node->safe_psql('postgres',
	q{SELECT extract(epoch FROM clock_timestamp()) FROM pg_stat_progress_create_index, pg_cancel_backend(pid)});
ok($node->poll_query_until('postgres', 'SELECT count(*) = 0 FROM pg_stat_progress_create_index'), 'build stopped');
eval { $bg->quit };
my ($stamp) = substr(slurp_file($node->logfile), $log_at) =~ /^(\d{4}-\d\d-\d\d [\d:.]+ \w+) \[\d+\] .*ERROR:  canceling statement due to user request/m;
ok(defined $stamp, 'the build logged its cancellation');
my $elapsed = $node->safe_psql('postgres', qq{SELECT extract(epoch FROM '$stamp'::timestamptz) - $t0});
ok($elapsed < 1.0, sprintf('build stopped %.3f s after the cancel request (server clock)', $elapsed));
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_class WHERE relname = 'items_idx'"), '0', 'no index left behind');
like(slurp_file($node->logfile), qr/canceling statement due to user request|canceling index build/, 'the build reported the cancellation');

my ($ret, $out, $err) = $node->psql('postgres', q{
	SET maintenance_work_mem = '8MB';
	CREATE INDEX items_idx ON items USING twotower_hnsw (v)}, extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/53200/, 'over-budget build fails with SQLSTATE 53200');
like($err, qr/maintenance_work_mem/, 'the error names maintenance_work_mem');
$node->stop;
done_testing();
