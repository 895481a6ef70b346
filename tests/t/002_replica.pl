# A streaming replica returns the same top-k as the primary after inserts, deletes, VACUUM and
# REINDEX; its cache file is verified, never trusted blindly.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TwoTower;

my $primary = new_node('primary', init => { allows_streaming => 1 });
make_items($primary, 'postgres', 'items', 20000, 16);
$primary->safe_psql('postgres', 'CREATE INDEX items_idx ON items USING twotower_hnsw (v real_cosine_ops)');
# Materialize the primary's cache file so the base backup copies it.
topk_signature($primary, 'postgres', 'items', 'OPERATOR(public.<=>)', 10, 1);

# pg_basebackup copies the cache directory with the data directory (it cannot exclude it); the
# copy is not trusted as it is: its verified-marker does not match the copy's inode, so the
# standby verifies it on first use.
my $pfile = $primary->safe_psql('postgres', "SELECT cache_file FROM twotower.index_info('items_idx')");
ok(-f $primary->data_dir . "/$pfile", "the primary has its cache file ($pfile)");
$primary->backup('b1');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'b1', has_streaming => 1);
ok(-f $standby->data_dir . "/$pfile", 'the base backup copied the cache file');
$standby->start;
is($standby->safe_psql('postgres', "SELECT cache_state FROM twotower.index_info('items_idx')"),
	'present (verified on first use)', 'the copied file is verified before its first use');

my @q = map { $_ * 97 } 1 .. 20;
my $op = 'OPERATOR(public.<=>)';
sub same_results
{
	my ($label) = @_;
	$primary->wait_for_catchup($standby);
	my $p = topk_signature($primary, 'postgres', 'items', $op, 10, @q);
	my $s = topk_signature($standby, 'postgres', 'items', $op, 10, @q);
	ok(length($p) > 100, "$label: primary answers");
	is($s, $p, "$label: standby returns the same top-10 as the primary");
	is($standby->safe_psql('postgres', "SELECT graph_items, graph_dead, delta_items FROM twotower.index_info('items_idx')"),
	   $primary->safe_psql('postgres', "SELECT graph_items, graph_dead, delta_items FROM twotower.index_info('items_idx')"),
	   "$label: standby index counters match");
}

same_results('after build');

$primary->safe_psql('postgres', q{
	INSERT INTO items (category, v)
	SELECT 1, ARRAY(SELECT (random() * 2 - 1)::real FROM generate_series(1, 16) WHERE i > 0) FROM generate_series(1, 500) i;
	DELETE FROM items WHERE id % 7 = 0;
});
same_results('after inserts and deletes');
$primary->safe_psql('postgres', 'VACUUM items');
same_results('after VACUUM');
is($standby->safe_psql('postgres', "SELECT graph_dead > 0 FROM twotower.index_info('items_idx')"), 't', 'tombstones replicated');

# Damage the standby's cache file: it must be detected and rebuilt from the pages.
my $file = $standby->safe_psql('postgres', "SELECT cache_file FROM twotower.index_info('items_idx')");
my $path = $standby->data_dir . "/$file";
ok(-f $path, 'standby cache file exists');
open(my $fh, '+<', $path) or die "open $path: $!";
binmode $fh;
seek($fh, 5000, 0);
print $fh "corrupted bytes, not a graph";
close $fh;
my $log_at = -s $standby->logfile;
same_results('after corrupting the standby cache file');
like(substr(slurp_file($standby->logfile), $log_at), qr/cache file "\Q$file\E" was rejected \(.*\); rebuilding it from the index pages/,
	'the damaged file was rejected (logged)');
open($fh, '<', $path) or die "open $path: $!";
binmode $fh;
seek($fh, 5000, 0);
read($fh, my $bytes, 28);
close $fh;
isnt($bytes, 'corrupted bytes, not a graph', 'and rewritten from the index pages');

$primary->safe_psql('postgres', 'REINDEX INDEX items_idx');
same_results('after REINDEX');
$primary->safe_psql('postgres', 'REINDEX INDEX CONCURRENTLY items_idx');
same_results('after REINDEX CONCURRENTLY');
is($standby->safe_psql('postgres', "SELECT delta_items, graph_dead FROM twotower.index_info('items_idx')"), '0|0',
	'REINDEX folded the delta and the tombstones into a new graph');

# Models reach the standby with the rest of the WAL; a switch on the primary is seen there.
my $g = $ENV{TT_GOLDEN};
$primary->safe_psql('postgres', qq{
	SELECT twotower.import_model_file('u', '$g/spec.json', '$g/weights.safetensors');
	SELECT twotower.import_model_file('u', '$g/item/spec.json', '$g/item/weights.safetensors', false);
});
$primary->wait_for_catchup($standby);
my $embed = q{SELECT twotower.embed_user('u', '{"user_id": 7, "history": [1001]}')::text};
is($standby->safe_psql('postgres', $embed), $primary->safe_psql('postgres', $embed), 'standby embeds like the primary');
$primary->safe_psql('postgres', q{SELECT twotower.activate_model('u', 2)});
$primary->wait_for_catchup($standby);
my ($ret, $out, $err) = $standby->psql('postgres', $embed);
like($err, qr/is an item tower/, 'the switch to version 2 reached the standby');

# How soon a refreshed item vector is searchable on the standby: the item's new vector is the
# query; the standby is polled from the primary's commit until the item leads its top 1.
use Time::HiRes qw(time usleep);
my @waits;
for my $round (1 .. 5)
{
	my $id = $round * 7 + 1;    # not a multiple of 7: those rows were deleted above
	my $qv = "ARRAY(SELECT ((($round * 7 + j) % 11) - 5)::real FROM generate_series(1, 16) j)";
	my $top1 = "SELECT id FROM items ORDER BY v OPERATOR(public.<=>) $qv LIMIT 1";
	my $t0 = time;
	$primary->safe_psql('postgres', "UPDATE items SET v = $qv WHERE id = $id");
	my $seen = '';
	while (time - $t0 < 30)
	{
		$seen = $standby->safe_psql('postgres', $top1);
		last if $seen eq $id;
		usleep(2000);
	}
	is($seen, $id, "refresh $round: the new vector leads on the standby");
	push @waits, (time - $t0) * 1000;
}
@waits = sort { $a <=> $b } @waits;
diag(sprintf('a refreshed vector searchable on the standby after %.0f ms (median of 5; min %.0f, max %.0f, from before the primary\'s commit, polling every 2 ms plus a psql start)',
	$waits[2], $waits[0], $waits[4]));

# A graph VACUUM retires (every row deleted) and the rows that replace it: the standby follows
# the metapage switch and the freed pages' reuse.
make_items($primary, 'postgres', 'gone', 2000, 16);
$primary->safe_psql('postgres', q{
	CREATE INDEX gone_idx ON gone USING twotower_hnsw (v real_cosine_ops);
	DELETE FROM gone;
	VACUUM gone;
	INSERT INTO gone (category, v)
	SELECT 2, ARRAY(SELECT (random() * 2 - 1)::real FROM generate_series(1, 16) WHERE i > 0) FROM generate_series(1, 1500) i;
});
$primary->wait_for_catchup($standby);
my @gq = (2001, 2500, 3000, 3499);
my $gp = topk_signature($primary, 'postgres', 'gone', $op, 10, @gq);
ok(length($gp) > 50, 'after a retired graph and new rows: the primary answers');
is(topk_signature($standby, 'postgres', 'gone', $op, 10, @gq), $gp, 'after a retired graph and new rows: the standby answers the same');
my $ginfo = "SELECT graph_items, graph_dead, delta_items FROM twotower.index_info('gone_idx')";
is($standby->safe_psql('postgres', $ginfo), $primary->safe_psql('postgres', $ginfo), 'and its counters match');
is($primary->safe_psql('postgres', $ginfo), '0|0|1500', 'the retired graph is gone, the new rows are in the delta');

# Serving on a standby: a split's variant recommends as on the primary; a list logged on the
# primary reaches the standby; logging on the standby fails clearly (25006), the call without a
# request id does not.
$primary->safe_psql('postgres', q{
	SELECT twotower.activate_model('u', 1);
	CREATE TABLE items8 (id bigint PRIMARY KEY, v real[]);
	INSERT INTO items8 SELECT i, ARRAY(SELECT sin(i * j)::real FROM generate_series(1, 8) j) FROM generate_series(1, 300) i;
	CREATE INDEX items8_idx ON items8 USING twotower_hnsw (v real_cosine_ops);
	SELECT twotower.save_pipeline('rp', '{"user_model": "u", "vectors": {"table": "items8", "vector_column": "v"},
	  "channels": [{"type": "twotower", "index": "items8_idx", "k": 20}], "k": 5}');
	SELECT twotower.save_pipeline('rs', '{"unit": "user_id", "variants": [{"name": "only", "pipeline": "rp", "share": 100}]}');
	SELECT count(*) FROM twotower.recommend('rs', '{"user_id": 7, "history": [1001]}', request_id => 'rep-1');
});
$primary->wait_for_catchup($standby);
my $rec = q{SELECT string_agg(item_id::text, ',' ORDER BY rank) FROM twotower.recommend('rs', '{"user_id": 7, "history": [1001]}')};
my $rp = $primary->safe_psql('postgres', $rec);
like($rp, qr/^\d+(,\d+){4}$/, 'the split recommends on the primary');
is($standby->safe_psql('postgres', $rec), $rp, 'and the same on the standby');
is($standby->safe_psql('postgres', q{SELECT variant || ':' || cardinality(items) FROM twotower.impression_log WHERE request_id = 'rep-1'}),
	'only:5', 'the list logged on the primary reached the standby');
($ret, $out, $err) = $standby->psql('postgres',
	q{SELECT * FROM twotower.recommend('rs', '{"user_id": 7, "history": [1001]}', request_id => 'rep-2')});
like($err, qr/cannot write the impression log in a read-only transaction/, 'logging on the standby fails clearly');
($ret, $out, $err) = $standby->psql('postgres', q{SELECT twotower.feedback('rep-1', 1)});
like($err, qr/cannot write the impression log in a read-only transaction/, 'and so does feedback');

$standby->stop;
$primary->stop;
done_testing();
