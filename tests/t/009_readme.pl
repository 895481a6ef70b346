# The README's SQL examples run as written: every ```sql block, in order, in one psql session
# started from a directory laid out like the repository (tests/golden), stopping at the first
# error.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use File::Path qw(make_path);
use TwoTower;

my $readme = "$ENV{TESTDIR}/README.md";
open(my $fh, '<', $readme) or die "cannot read $readme: $!";
my $text = do { local $/; <$fh> };
close $fh;
my @blocks = $text =~ /^```sql\n(.*?)^```/gms;
cmp_ok(scalar @blocks, '>=', 2, 'README has SQL examples');

my $node = new_node('readme', dbs => []);

my $root = PostgreSQL::Test::Utils::tempdir();
make_path("$root/tests");
symlink($ENV{TT_GOLDEN}, "$root/tests/golden") or die "symlink: $!";
chdir $root or die "chdir: $!";

my $script = join("\n", @blocks);
my ($stdout, $stderr);
my $ok = IPC::Run::run(
	[ 'psql', '-X', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres') ],
	'<', \$script, '>', \$stdout, '2>', \$stderr);
ok($ok, 'every README example runs') or diag($stderr);
unlike($stderr, qr/ERROR/, 'no errors');
like($stdout, qr/items_embedding_idx|f32/, 'index_info answers');
like($stdout, qr/inserted \| updated \| deleted \| unchanged\s*\n-+\+.*\n\s+10000 \|\s+0 \|\s+0 \|\s+0/,
	'the refresh inserts the whole catalogue');
like($stdout, qr/rank \|\s+title\s+\|\s+score\s*\n[-+]+\n\s+1 \| item \d+/, 'recall returns ranked catalogue items');
unlike($stdout, qr/\| item 1[12] \|/, 'excluded items are not recalled');
$node->stop;
done_testing();
