# A build reports progress in pg_stat_progress_create_index and stops soon after a cancel request
# (within a second on an idle machine; checked against a bound of 10 s, generous for a loaded one,
# while the whole build would take far longer); a build over the memory budget stops with
# SQLSTATE 53200.
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
cmp_ok($elapsed, '<', 10, sprintf('build stopped %.3f s after the cancel request (server clock)', $elapsed));
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_class WHERE relname = 'items_idx'"), '0', 'no index left behind');
like(slurp_file($node->logfile), qr/canceling statement due to user request|canceling index build/, 'the build reported the cancellation');

my ($ret, $out, $err) = $node->psql('postgres', q{
	SET maintenance_work_mem = '8MB';
	CREATE INDEX items_idx ON items USING twotower_hnsw (v)}, extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/53200/, 'over-budget build fails with SQLSTATE 53200');
like($err, qr/maintenance_work_mem/, 'the error names maintenance_work_mem');

# Training: progress in twotower.train_progress while it runs, visible to its role and to
# pg_read_all_stats, not to others; a cancel stops it soon (bound: 10 s, as for the build), with
# no version and no progress file left.
$node->safe_psql('postgres', q{
	CREATE TABLE tr_events AS
	SELECT u AS user_id, (u % 20) + 20 * ((u * 7 + t) % 25) AS item_id, t AS ts
	  FROM generate_series(0, 1999) u, generate_series(1, 40) t;
	CREATE ROLE tr_other LOGIN;
	CREATE ROLE tr_stats LOGIN IN ROLE pg_read_all_stats;
	GRANT USAGE ON SCHEMA twotower TO tr_other, tr_stats;});
my $opts = '{"dim": 16, "epochs": 200, "batch_size": 64, "validation": "none",'
  . ' "user": {"features": [{"name": "user_id", "type": "categorical"}], "hidden": [64]},'
  . ' "item": {"features": [{"name": "item_id", "type": "categorical"}], "hidden": [64]}}';
$bg = $node->background_psql('postgres', on_error_stop => 0);
$bg->query_until(qr/started/, "\\echo started\nSELECT * FROM twotower.train('tp_user', 'tp_item', 'tr_events', '$opts');\n");
ok($node->poll_query_until('postgres', q{
	SELECT phase = 'training' AND step > 0 AND steps >= step AND epochs = 200 AND loss IS NOT NULL
	       AND user_model = 'tp_user' AND usename = current_user
	  FROM twotower.train_progress}),
	'train_progress shows the run: phase, epoch, step, loss');
my $upd = $node->safe_psql('postgres', 'SELECT updated_at FROM twotower.train_progress');
ok($node->poll_query_until('postgres', "SELECT updated_at > '$upd' FROM twotower.train_progress"),
	'and its row moves while it runs');
is($node->safe_psql('postgres', 'SELECT count(*) FROM twotower.train_progress', extra_params => ['-U', 'tr_other']),
	'0', "another role does not see the run");
is($node->safe_psql('postgres', 'SELECT count(*) FROM twotower.train_progress', extra_params => ['-U', 'tr_stats']),
	'1', 'a member of pg_read_all_stats does');
$log_at = -s $node->logfile;
$t0 = $node->safe_psql('postgres',
	q{SELECT extract(epoch FROM clock_timestamp()) FROM twotower.train_progress, pg_cancel_backend(pid)});
ok($node->poll_query_until('postgres', 'SELECT count(*) = 0 FROM twotower.train_progress'), 'training stopped');
eval { $bg->quit };
($stamp) = substr(slurp_file($node->logfile), $log_at) =~ /^(\d{4}-\d\d-\d\d [\d:.]+ \w+) \[\d+\] .*ERROR:  canceling statement due to user request/m;
ok(defined $stamp, 'the run logged its cancellation');
$elapsed = $node->safe_psql('postgres', qq{SELECT extract(epoch FROM '$stamp'::timestamptz) - $t0});
cmp_ok($elapsed, '<', 10, sprintf('training stopped %.3f s after the cancel request (server clock)', $elapsed));
is($node->safe_psql('postgres', "SELECT count(*) FROM twotower.model_version WHERE model LIKE 'tp\\_%'"), '0',
	'no version left behind');
my $dir = $node->data_dir . '/pg_twotower/progress';
is(scalar(() = glob("$dir/*")), 0, 'no progress file left behind');

# A crash (every process killed) leaves the file of the training backend; the view never shows it, and the next run
# removes it.
$bg = $node->background_psql('postgres', on_error_stop => 0);
$bg->query_until(qr/started/, "\\echo started\nSELECT * FROM twotower.train('tp_user', 'tp_item', 'tr_events', '$opts');\n");
ok($node->poll_query_until('postgres', q{SELECT phase = 'training' FROM twotower.train_progress}), 'second run training');
my $pid = $node->safe_psql('postgres', 'SELECT pid FROM twotower.train_progress');
kill_mid_statement($node, $bg, 'training');
$node->start;
ok(-e "$dir/$pid.json", 'the killed backend left its progress file');
is($node->safe_psql('postgres', 'SELECT count(*) FROM twotower.train_progress'), '0', 'the view does not show it');
$node->safe_psql('postgres', q{SELECT * FROM twotower.train('tp_user', 'tp_item', 'tr_events',
	'{"epochs": 1, "user": {"features": [{"name": "user_id", "type": "categorical"}]},
	  "item": {"features": [{"name": "item_id", "type": "categorical"}]}}')});
ok(!-e "$dir/$pid.json", 'the next run removed it');
is(scalar(() = glob("$dir/*")), 0, 'and its own file is gone when it ends');

$node->stop;
done_testing();
