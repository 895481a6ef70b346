# The cache directory holds exactly the files of live indexes: after REINDEX, REINDEX
# CONCURRENTLY, DROP INDEX, DROP DATABASE and DROP EXTENSION, on the primary and on a standby.
# A cache directory that cannot be written degrades to backend memory (one WARNING), and a
# cache file truncated or rewritten under a backend's mapping is detected, not read.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TwoTower;

my $primary = new_node('cprimary', init => { allows_streaming => 1 }, dbs => ['d1']);
make_items($primary, 'd1', 'items', 3000, 8);
$primary->safe_psql('d1', q{
	CREATE INDEX idx_a ON items USING twotower_hnsw (v real_cosine_ops);
	CREATE INDEX idx_b ON items USING twotower_hnsw (v real_l2_ops);
});
# The build writes its own node's cache file from the bytes it checksummed and records it as
# verified, so the first query after a build reads its header only (no index_info call opens
# an image; nothing has queried the index yet).
for my $i ('idx_a', 'idx_b')
{
	my $built = $primary->data_dir . '/' . $primary->safe_psql('d1', "SELECT cache_file FROM twotower.index_info('$i')");
	ok(-s $built && -e "$built.ok", "$i: the build wrote its cache file and recorded it as verified");
}
$primary->backup('b1');
my $standby = PostgreSQL::Test::Cluster->new('cstandby');
$standby->init_from_backup($primary, 'b1', has_streaming => 1);
$standby->start;

my %ops = (idx_a => 'OPERATOR(public.<=>)', idx_b => 'OPERATOR(public.<->)');

# Uses every index of d1 (materializing its cache file) through an index scan, checked by plan.
sub use_indexes
{
	my ($node, @idx) = @_;
	for my $i (@idx)
	{
		my $q = qq{SELECT id FROM items ORDER BY v $ops{$i} (SELECT v FROM items WHERE id = 1) LIMIT 3};
		like($node->safe_psql('d1', "SET enable_seqscan = off; SET enable_bitmapscan = off; EXPLAIN (COSTS OFF) $q"),
			qr/Index Scan using $i/, $node->name . ": $i is used");
		$node->safe_psql('d1', "SET enable_seqscan = off; SET enable_bitmapscan = off; $q");
	}
}

# The .img files in the cache directory, sorted.
sub files_in
{
	my ($node) = @_;
	my $dir = $node->data_dir . '/pg_twotower';
	opendir(my $dh, $dir) or return '';
	my @f = sort grep { /\.img$/ } readdir($dh);
	closedir $dh;
	return join(' ', @f);
}

# The cache files the live indexes of d1 use.
sub live_files
{
	my ($node, @idx) = @_;
	my @f;
	for my $i (@idx)
	{
		my $p = $node->safe_psql('d1', "SELECT cache_file FROM twotower.index_info('$i')");
		$p =~ s{.*/}{};
		push @f, $p;
	}
	return join(' ', sort @f);
}

sub check_exact
{
	my ($label, @idx) = @_;
	$primary->wait_for_catchup($standby);
	for my $node ($primary, $standby)
	{
		use_indexes($node, @idx);
		# A new connection loads the library, which sweeps files of relations that are gone.
		$node->safe_psql('d1', 'SELECT twotower.vector_dims(ARRAY[1]::real[])');
		is(files_in($node), live_files($node, @idx), $node->name . ": $label: only live indexes' files");
	}
}

check_exact('after build', 'idx_a', 'idx_b');
$primary->safe_psql('d1', 'REINDEX INDEX idx_a');
check_exact('after REINDEX', 'idx_a', 'idx_b');
$primary->safe_psql('d1', 'REINDEX INDEX CONCURRENTLY idx_a');
check_exact('after REINDEX CONCURRENTLY', 'idx_a', 'idx_b');

# A drop in a session that has pg_twotower loaded removes the file at commit, without any
# later query (other sessions' drops are swept when a backend next loads the library).
my $before = files_in($primary);
$primary->safe_psql('d1', 'SELECT twotower.vector_dims(ARRAY[1]::real[]); DROP INDEX idx_b');
isnt(files_in($primary), $before, 'primary: DROP INDEX removed the file at commit');
check_exact('after DROP INDEX', 'idx_a');

# Another database's files go with DROP DATABASE.
$primary->safe_psql('postgres', 'CREATE DATABASE d2');
$primary->safe_psql('d2', 'CREATE EXTENSION pg_twotower');
make_items($primary, 'd2', 'items', 500, 8);
$primary->safe_psql('d2', q{CREATE INDEX idx_c ON items USING twotower_hnsw (v real_cosine_ops);
	SET enable_seqscan = off; SELECT id FROM items ORDER BY v OPERATOR(public.<=>) (SELECT v FROM items WHERE id = 1) LIMIT 3});
$primary->wait_for_catchup($standby);
$standby->safe_psql('d2', q{SET enable_seqscan = off; SELECT id FROM items ORDER BY v OPERATOR(public.<=>) (SELECT v FROM items WHERE id = 1) LIMIT 3});
my $d2 = $primary->safe_psql('postgres', "SELECT oid FROM pg_database WHERE datname = 'd2'");
like(files_in($primary), qr/_${d2}_/, 'primary: d2 has a cache file');
like(files_in($standby), qr/_${d2}_/, 'standby: d2 has a cache file');
$primary->safe_psql('postgres', "LOAD 'pg_twotower'; DROP DATABASE d2");
unlike(files_in($primary), qr/_${d2}_/, 'primary: DROP DATABASE removed its files at commit');
check_exact('after DROP DATABASE', 'idx_a');
unlike(files_in($standby), qr/_${d2}_/, 'standby: DROP DATABASE removed its files');

# A cache directory that cannot be written: scans read the image into memory, with a WARNING.
my $dir = $primary->data_dir . '/pg_twotower';
unlink glob("$dir/*");
chmod 0555, $dir or die "chmod: $!";
my $q = q{SET enable_seqscan = off; SELECT string_agg(id::text, ',') FROM
	(SELECT id FROM items ORDER BY v OPERATOR(public.<=>) (SELECT v FROM items WHERE id = 1) LIMIT 10) s};
my ($ret, $out, $err) = $primary->psql('d1', $q);
is($ret, 0, 'unwritable cache directory: the query still succeeds');
like($err, qr/could not write the index cache file/, 'with a WARNING');
like($primary->safe_psql('d1', "SELECT cache_state FROM twotower.index_info('idx_a')"), qr/absent|memory/, 'no cache file was written');
# Rebuilds while the directory stays unwritable: a backend keeps one copy of an index's image
# in memory, not one per rebuild it has read (they are never read again).
$primary->safe_psql('d1', q{
	SELECT setseed(0.5);
	CREATE TABLE big AS SELECT g AS id, ARRAY(SELECT (random() * 2 - 1)::real FROM generate_series(1, 64) WHERE g > 0) AS v
	  FROM generate_series(1, 20000) g;
	CREATE INDEX big_idx ON big USING twotower_hnsw (v);
});
my $bigq = q{SELECT count(*) FROM (SELECT id FROM big ORDER BY v OPERATOR(public.<=>) (SELECT v FROM big WHERE id = 1) LIMIT 10) s};
my $mem = $primary->background_psql('d1', on_error_stop => 0);
$mem->query_safe('SET enable_seqscan = off');
my $mem_pid = $mem->query_safe('SELECT pg_backend_pid()');
sub rss_anon { open(my $f, '<', "/proc/$_[0]/status") or die; while (<$f>) { return $1 if /^RssAnon:\s+(\d+)/; } die 'no RssAnon'; }
$mem->query($bigq);
my $anon0 = rss_anon($mem_pid);
for (1 .. 6)
{
	$primary->safe_psql('d1', 'REINDEX INDEX big_idx');
	$mem->query($bigq);
}
my $anon6 = rss_anon($mem_pid);
my $image_kb = int($primary->safe_psql('d1', "SELECT image_bytes FROM twotower.index_info('big_idx')") / 1024);
cmp_ok($anon6 - $anon0, '<', 2 * $image_kb,
	"six rebuilds read into memory: the backend grew by @{[$anon6 - $anon0]} kB (one image: $image_kb kB)");
$mem->quit;
$primary->safe_psql('d1', 'DROP TABLE big');
chmod 0700, $dir;
# (No index in the reference: a sequential scan and a sort.)
my $exact = $primary->safe_psql('d1', q{SET enable_indexscan = off; SET enable_bitmapscan = off;
	SELECT string_agg(id::text, ',') FROM
	(SELECT id FROM items ORDER BY v OPERATOR(public.<=>) (SELECT v FROM items WHERE id = 1), id LIMIT 10) s});
is($out, $exact, 'answers from memory equal exact search');

# REINDEX CONCURRENTLY gives the index a new oid and removes the old cache file: a session that
# had mapped it lets the mapping go (the removed file's disk space is freed), at its next scan
# or its next statement.
my $maps = $primary->background_psql('d1');
$maps->query_safe('SET enable_seqscan = off');
my $maps_pid = $maps->query_safe('SELECT pg_backend_pid()');
sub deleted_maps
{
	open(my $f, '<', "/proc/$_[0]/maps") or die;
	my %files = map { /(\S+\.img) \(deleted\)$/ ? ($1 => 1) : () } <$f>;
	return scalar(keys %files);
}
$maps->query_safe($q);
for (1 .. 4)
{
	$primary->safe_psql('d1', 'REINDEX INDEX CONCURRENTLY idx_a');
	$maps->query_safe($q);
}
is(deleted_maps($maps_pid), 0, 'after four REINDEX CONCURRENTLY and a scan after each: no mapping of a removed cache file');
$primary->safe_psql('d1', 'REINDEX INDEX CONCURRENTLY idx_a');
$maps->query_safe('SELECT 1');
is(deleted_maps($maps_pid), 0, 'after one more and a statement without a scan: none either');
$maps->quit;

# A mapped cache file truncated or overwritten under a live session: detected, not read.
my $bg = $primary->background_psql('d1');
$bg->query_safe('SET enable_seqscan = off');
my $first = $bg->query_safe($q);
my $file = $primary->data_dir . '/' . $primary->safe_psql('d1', "SELECT cache_file FROM twotower.index_info('idx_a')");
ok(-s $file, 'the session mapped a cache file');
truncate($file, 4096) or die "truncate: $!";
is($bg->query_safe($q), $first, 'truncated file: same answer, no crash');
open(my $fh, '+<', $file) or die "open: $!";
binmode $fh; seek($fh, 100, 0); print $fh ("garbage" x 200); close $fh;
is($bg->query_safe($q), $first, 'overwritten file: same answer, no crash');

# Changed while a scan is reading it: a cursor keeps an index scan open across FETCHes, and a
# 2 % filter makes the rest of the scan search again (wider rounds) after the file changed. A
# truncated mapping would raise SIGBUS on its lost pages (a crash of the whole server before
# the guard); now the FETCH fails with an ERROR, other sessions live on, and the next query
# answers from a file verified or rewritten from the index pages.
my $watch = $primary->background_psql('d1');
my $watch_pid = $watch->query_safe('SELECT pg_backend_pid()');
my $filtered = q{SELECT id FROM items WHERE id % 50 = 0
	ORDER BY v OPERATOR(public.<=>) (SELECT v FROM items WHERE id = 1)};
$bg->query_safe('\\set ON_ERROR_STOP 0');
for my $how ('truncated', 'overwritten')
{
	is($bg->query_safe($q), $first, "before the $how-mid-scan case: same answer");
	$file = $primary->data_dir . '/' . $primary->safe_psql('d1', "SELECT cache_file FROM twotower.index_info('idx_a')");
	$bg->query_safe("BEGIN; DECLARE c CURSOR FOR $filtered");
	like($bg->query_safe('EXPLAIN (COSTS OFF) ' . $filtered), qr/Index Scan using idx_a/, "$how mid-scan: the cursor's plan is the index scan");
	is(scalar(split /\n/, $bg->query_safe('FETCH 5 FROM c')), 5, "$how mid-scan: the first rows come");
	if ($how eq 'truncated')
	{
		truncate($file, 4096) or die "truncate: $!";
	}
	else
	{
		open(my $g, '+<', $file) or die "open: $!";
		binmode $g; seek($g, 200, 0); print $g ("\xff" x 4000); close $g;
	}
	my ($rows, $failed) = $bg->query('FETCH ALL FROM c');
	ok($failed, "$how mid-scan: the rest of the scan fails");
	like($bg->{stderr}, qr/cache file changed while a scan was reading it/, "$how mid-scan: with the cache error");
	$bg->{stderr} = '';
	$bg->query_safe('ROLLBACK');
	is($bg->query_safe($q), $first, "$how mid-scan: the next query answers as before");
	is($watch->query_safe('SELECT pg_backend_pid()'), $watch_pid, "$how mid-scan: another session lives on (no crash recovery)");
}
$watch->quit;
$bg->quit;
is($primary->safe_psql('d1', 'SELECT 1'), '1', 'server still up');

# DROP EXTENSION drops the indexes (through their operator classes) and their files.
$primary->safe_psql('d1', 'SELECT twotower.vector_dims(ARRAY[1]::real[]); DROP EXTENSION pg_twotower CASCADE');
$primary->wait_for_catchup($standby);
is(files_in($primary), '', 'primary: DROP EXTENSION left no cache file');
$standby->safe_psql('postgres', 'LOAD \'pg_twotower\'');
is(files_in($standby), '', 'standby: no cache file after DROP EXTENSION');

$standby->stop;
$primary->stop;
done_testing();
