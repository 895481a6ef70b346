# The documentation's SQL examples run as written.
#
# - Each page of docs/ with ```sql blocks: its blocks, in order, in ONE psql session
#   (psql -X -v ON_ERROR_STOP=1) on a fresh database of its own with pg_twotower created, after
#   the page's setup below; the first error fails the page with the block and psql's stderr.
# - The README: each ```sql block in a NEW psql session (blocks 1, 2, 3 in order, in one
#   database), so a block that leans on an earlier block's SET fails.
#
# psql runs from a directory laid out like the repository (tests/golden), which also holds the
# files the pages import from psql's working directory (user_spec.json and
# user_weights.safetensors: the golden user tower, which is what docs/pytorch-export.md's
# export writes).
#
# A page whose examples work on tables it does not create says where they come from (e.g. the
# MovieLens demo's database); its setup here creates small deterministic stand-ins with the same
# names (a few hundred rows), never anything the page's text does not promise.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use File::Copy qw(copy);
use File::Path qw(make_path);
use TwoTower;

my $golden = $ENV{TT_GOLDEN} or die 'TT_GOLDEN is not set';
my $node = new_node('docs', dbs => []);

my $root = PostgreSQL::Test::Utils::tempdir();
make_path("$root/tests");
symlink($golden, "$root/tests/golden") or die "symlink: $!";
copy("$golden/spec.json", "$root/user_spec.json") or die "copy: $!";
copy("$golden/weights.safetensors", "$root/user_weights.safetensors") or die "copy: $!";
chdir $root or die "chdir: $!";

# The ```sql blocks of a Markdown file, in order (a fence may be indented, e.g. in a list item:
# the indentation is removed from the block's lines).
sub sql_blocks
{
	my ($file) = @_;
	open(my $fh, '<', $file) or die "cannot read $file: $!";
	my $text = do { local $/; <$fh> };
	close $fh;
	my @blocks;
	while ($text =~ /^([ \t]*)```sql[ \t]*\n(.*?)^\1```[ \t]*$/gms)
	{
		my ($indent, $body) = ($1, $2);
		$body =~ s/^\Q$indent\E//gm if length $indent;
		push @blocks, $body;
	}
	return @blocks;
}

# Runs $script through psql on database $db; returns (ok, stdout, stderr).
sub run_psql
{
	my ($db, $script) = @_;
	my ($stdout, $stderr) = ('', '');
	my $ok = IPC::Run::run(
		[ 'psql', '-X', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr($db) ],
		'<', \$script, '>', \$stdout, '2>', \$stderr);
	return ($ok, $stdout, $stderr);
}

# Keeps what psql printed in the test's log directory (tmp_check/log/docs_<page>.out, readme_<block>.out).
sub save_output
{
	my ($name, $stdout, $stderr) = @_;
	open(my $fh, '>', "$PostgreSQL::Test::Utils::log_path/$name.out") or return;
	print $fh $stdout, "\n---- stderr\n", $stderr;
	close $fh;
}

# ---------------------------------------------------------------------------------------------
# Stand-ins.

# The README's towers example (README block 2), as docs/operations.md and docs/sql-reference.md
# assume it: the golden towers imported as user_tower and item_tower, the catalogue `catalog`,
# the vector table `item_vectors` and its index item_vectors_embedding_idx.
my $readme_towers = qq{
	SELECT twotower.import_model_file('user_tower', '$golden/spec.json', '$golden/weights.safetensors');
	SELECT twotower.import_model_file('item_tower', '$golden/item/spec.json', '$golden/item/weights.safetensors');
	CREATE TABLE catalog (item_id bigint PRIMARY KEY, title text, category text, tags text[],
	                      price numeric, img_vec real[]);
	INSERT INTO catalog
	SELECT i, 'item ' || i, (ARRAY['shoes', 'shirts', 'hats', 'bags'])[1 + i % 4], ARRAY['red'],
	       10 + i % 90, ARRAY[sin(i), cos(i), sin(2 * i)]::real[]
	  FROM generate_series(1, 300) i;
	CREATE TABLE item_vectors (id bigint PRIMARY KEY, embedding real[]);
	CREATE INDEX item_vectors_embedding_idx ON item_vectors USING twotower_hnsw (embedding);
	SELECT * FROM twotower.refresh_item_vectors('item_tower', 'catalog', 'item_vectors', id_column => 'item_id');
};

# The MovieLens demo's database (scripts/movielens.sh), small: 60 users, 200 movies, 600 ratings
# in 6 taste groups, with the demo's names and columns.
my $ml_tables = q{
	CREATE TABLE ml_users (user_id int PRIMARY KEY, age int, gender text, occupation text, zip text);
	INSERT INTO ml_users
	SELECT u, 18 + u % 50, (ARRAY['M', 'F'])[1 + u % 2],
	       (ARRAY['student', 'engineer', 'writer', 'artist'])[1 + u % 4], lpad((u * 37)::text, 5, '0')
	  FROM generate_series(1, 60) u;
	CREATE TABLE ml_items (item_id int PRIMARY KEY, title text, year int, genres text[]);
	INSERT INTO ml_items
	SELECT i, 'Movie ' || i, 1950 + i % 48,
	       ARRAY[(ARRAY['Drama', 'Comedy', 'Action', 'Thriller', 'Romance'])[1 + i % 5],
	             (ARRAY['War', 'Crime', 'Children', 'Sci-Fi'])[1 + i % 4]]
	  FROM generate_series(1, 200) i;
	CREATE TABLE ml_ratings (seq bigserial, user_id int NOT NULL, item_id int NOT NULL, rating real, ts bigint NOT NULL);
	INSERT INTO ml_ratings (user_id, item_id, rating, ts)
	SELECT u, 1 + (u % 6) * 30 + (u * 3 + t * 7) % 30, 1 + (u + t) % 5, 880000000 + t * 86400 + u * 60
	  FROM generate_series(1, 60) u, generate_series(1, 10) t
	 ORDER BY t, u;
	CREATE TEMP TABLE ordered AS
	SELECT r.*, row_number() OVER (PARTITION BY user_id ORDER BY ts DESC, seq DESC) AS from_end FROM ml_ratings r;
	CREATE TABLE ml_train AS SELECT user_id, item_id, ts FROM ordered WHERE from_end > 1 ORDER BY seq;
	CREATE TABLE ml_test AS SELECT user_id, item_id, ts FROM ordered WHERE from_end = 1 ORDER BY seq;
	ANALYZE ml_users, ml_items, ml_ratings, ml_train, ml_test;
};

# The demo's towers ml_user and ml_item (its features, smaller), the vector table
# ml_item_vectors and its index ml_item_vectors_idx.
my $ml_towers = q{
	SET client_min_messages = warning;
	SELECT count(*) FROM twotower.train('ml_user', 'ml_item', 'ml_train',
	  '{"dim": 16, "epochs": 2, "k": 10, "seed": 42,
	    "user": {"features": [{"name": "user_id", "type": "categorical"},
	                          {"name": "gender", "type": "categorical", "dim": 4},
	                          {"name": "occupation", "type": "categorical", "dim": 8},
	                          {"name": "age", "type": "numeric"},
	                          {"name": "history", "type": "history", "max_len": 50, "decay": {"position": 0.97}}]},
	    "item": {"features": [{"name": "item_id", "type": "categorical"},
	                          {"name": "genres", "type": "multi_categorical", "dim": 8},
	                          {"name": "year", "type": "numeric"}]}}',
	  user_features => 'ml_users', item_features => 'ml_items');
	CREATE TABLE ml_item_vectors (id bigint PRIMARY KEY, embedding real[]);
	SELECT * FROM twotower.refresh_item_vectors('ml_item', 'ml_items', 'ml_item_vectors', id_column => 'item_id');
	CREATE INDEX ml_item_vectors_idx ON ml_item_vectors USING twotower_hnsw (embedding);
};

# The demo's item-CF and Swing channels.
my $ml_channels = q{
	SELECT count(*) FROM twotower.build_channel('ml_itemcf', 'itemcf', 'ml_train', 'ml_itemcf_nb', '{"alpha": 0.3, "top_n": 200}');
	SELECT count(*) FROM twotower.build_channel('ml_swing', 'swing', 'ml_train', 'ml_swing_nb', '{"beta": 0.5, "top_n": 200}');
};

# The demo's cascade (scripts/movielens-cascade.sql): the recall pipeline ml_recall, the log
# ml_log_requests / ml_log_candidates (with a teacher score) and the distilled student
# ml_student.
my $ml_cascade = q{
	SET client_min_messages = warning;
	SELECT twotower.save_pipeline('ml_recall', '{
	  "user_model": "ml_user", "vectors": {"table": "ml_item_vectors"}, "history": "history",
	  "item_features": {"table": "ml_items", "id_column": "item_id"},
	  "channels": [{"name": "twotower", "type": "twotower", "index": "ml_item_vectors_idx", "k": 200},
	               {"name": "itemcf", "type": "i2i", "channel": "ml_itemcf", "k": 200, "history_len": 20, "decay": 0.8},
	               {"name": "swing", "type": "i2i", "channel": "ml_swing", "k": 200, "history_len": 10, "decay": 0.9}],
	  "merge": {"strategy": "rrf", "options": {"weights": {"twotower": 2}}, "k": 300}, "k": 300}');
	CREATE TABLE ml_log_requests AS
	SELECT user_id AS request_id, user_id, item_id::bigint AS next_item,
	       twotower.user_features('ml_user', user_id::text, to_timestamp(ts - 1)) AS features,
	       ARRAY(SELECT s.item_id::bigint FROM ml_train s WHERE s.user_id = t.user_id AND s.ts < t.ts) AS seen
	  FROM (SELECT t.*, row_number() OVER (PARTITION BY user_id ORDER BY ts DESC, ctid DESC) AS from_end FROM ml_train t) t
	 WHERE from_end = 1;
	CREATE TABLE ml_log_candidates AS
	SELECT r.request_id, c.item_id, (c.item_id = r.next_item)::int::real AS label, c.rank,
	       (-ln(c.rank) + 3 * (c.item_id = r.next_item)::int)::real AS teacher
	  FROM ml_log_requests r, twotower.recommend('ml_recall', r.features, exclude => r.seen) c;
	SELECT count(*) FROM twotower.train_prerank('ml_student', 'ml_recall', 'ml_log_requests', 'ml_log_candidates',
	  '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"},
	                           {"name": "hmax", "type": "cross", "of": "history_max"},
	                           {"name": "hmean", "type": "cross", "of": "history_mean"},
	                           {"name": "rr", "type": "cross", "of": "recall_rank"}],
	              "hidden": [16]},
	    "objective": "distill", "lambda": 0.5, "ramp_steps": 200, "epochs": 2, "k": 50, "seed": 42}',
	  teacher_column => 'teacher', rank_column => 'rank');
};

# docs/operations.md grants twotower_admin to an existing role ml_engineer.
my $ml_engineer = q{
	DO $$ BEGIN CREATE ROLE ml_engineer LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
};

my %setup = (
	'channels.md'      => [ $ml_tables, $ml_towers, $ml_channels ],
	'funnel.md'        => [ $ml_tables, $ml_towers, $ml_channels, $ml_cascade ],
	'training.md'      => [ $ml_tables ],
	'operations.md'    => [ $readme_towers, $ml_engineer ],
	'sql-reference.md' => [ $readme_towers ],
	'serving.md'       => [ $ml_tables, $ml_towers, $ml_channels ],
);

# ---------------------------------------------------------------------------------------------
# The README: each block in a new session.

my @readme = sql_blocks("$ENV{TESTDIR}/README.md");
cmp_ok(scalar @readme, '>=', 3, 'README has SQL examples');
$node->safe_psql('postgres', 'CREATE DATABASE readme');
for my $i (0 .. $#readme)
{
	my $n = $i + 1;
	my ($ok, $stdout, $stderr) = run_psql('readme', $readme[$i]);
	save_output("readme_$n", $stdout, $stderr);
	ok($ok && $stderr !~ /ERROR/, "README block $n runs in a session of its own")
	  or diag("README block $n:\n$readme[$i]\nstderr:\n$stderr");
}

# ---------------------------------------------------------------------------------------------
# docs/*.md: each page in one session on its own database.

my $sharedir = `pg_config --sharedir`;
chomp $sharedir;
my $have_pgvector = -f "$sharedir/extension/vector.control";
opendir(my $dh, "$ENV{TESTDIR}/docs") or die "cannot list docs: $!";
my @pages = sort grep { /\.md$/ } readdir $dh;
closedir $dh;
my $pages_with_sql = 0;
for my $page (@pages)
{
	my @blocks = sql_blocks("$ENV{TESTDIR}/docs/$page");
	next unless @blocks;
	$pages_with_sql++;
	# A page for pgvector users needs pgvector (scripts/pgvector.sh): said, not hidden.
	if (grep({ /CREATE EXTENSION (IF NOT EXISTS )?(vector|pg_twotower_pgvector)\b/ } @blocks) && !$have_pgvector)
	{
	  SKIP: { skip("docs/$page needs pgvector, which is not installed (scripts/pgvector.sh installs it)", 1); }
		next;
	}
	(my $db = "docs_$page") =~ s/\.md$//;
	$db =~ s/[^a-z0-9_]/_/g;
	$node->safe_psql('postgres', "CREATE DATABASE $db");
	$node->safe_psql($db, 'CREATE EXTENSION pg_twotower');
	for my $sql (@{ $setup{$page} // [] })
	{
		my ($ret, $out, $err) = $node->psql($db, $sql, on_error_stop => 1);
		die "setup of docs/$page failed:\n$err\n" if $ret != 0;
	}
	my $script = '';
	for my $i (0 .. $#blocks)
	{
		$script .= "\\echo '<<docs block " . ($i + 1) . ">>'\n$blocks[$i]\n";
	}
	my ($ok, $stdout, $stderr) = run_psql($db, $script);
	save_output($db, $stdout, $stderr);
	my @reached = $stdout =~ /<<docs block (\d+)>>/g;
	my $n = @reached ? $reached[-1] : 1;
	ok($ok && $stderr !~ /ERROR/, "docs/$page: its " . scalar(@blocks) . " SQL blocks run in one session")
	  or diag("docs/$page, block $n of " . scalar(@blocks) . ":\n$blocks[$n - 1]\nstderr:\n$stderr");
}
cmp_ok($pages_with_sql, '>=', 6, 'the docs have SQL examples on several pages');

$node->stop;
done_testing();
