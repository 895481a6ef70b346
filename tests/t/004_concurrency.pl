# Mixed load: ordered (filtered) queries, inserts, deletes, VACUUM and REINDEX CONCURRENTLY at the
# same time, with zero errors. TT_SOAK_SECONDS sets the duration (default 30; an hour = 3600).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TwoTower;

my $secs = $ENV{TT_SOAK_SECONDS} // 30;
my $node = PostgreSQL::Test::Cluster->new('load');
$node->init;
$node->append_conf('postgresql.conf', "maintenance_work_mem = '512MB'\nmax_connections = 50\nsearch_path = 'public, twotower'");
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION pg_twotower');
make_items($node, 'postgres', 'items', 20000, 16);
$node->safe_psql('postgres', 'CREATE INDEX items_idx ON items USING twotower_hnsw (v)');

my $dir = PostgreSQL::Test::Utils::tempdir;
sub script { my ($name, $body) = @_; my $f = "$dir/$name.sql"; open(my $fh, '>', $f) or die; print $fh $body; close $fh; return $f; }
my $query = script('query', q{
\set id random(1, 20000)
SET enable_seqscan = off;
SELECT id FROM items WHERE category = 3 ORDER BY v <=> (SELECT v FROM items WHERE id = :id) LIMIT 10;
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

is(index_scan_count($node, 'postgres', 'items', '<=>', 16), $node->safe_psql('postgres', 'SELECT count(*) FROM items'),
	'after the load, the index covers exactly the live rows');
my $log = slurp_file($node->logfile);
unlike($log, qr/PANIC|TRAP|terminated by signal/, 'no backend crashed');
$node->stop;
done_testing();
