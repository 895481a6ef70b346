# pgvector's HNSW scenarios that 010_pgvector_scenarios.pl leaves out, for twotower_hnsw
# (pgvector's test/t numbers): recall after concurrent inserts for each operator class (013),
# concurrent inserts into an empty index (016), duplicates at ef_search = 1 and concurrent
# duplicate inserts (015), the planner with a selective filter, a distance range, a LATERAL join
# and a partial index (017), filtered recall at 2 % and 0.2 % in strict and relaxed order
# (043/044), recall before VACUUM with a low m (014), the index size over delete-all / VACUUM /
# re-insert cycles (011), and VACUUM as a weighted pgbench script among SELECTs, INSERTs and
# DELETEs (046).
#
# Every reference is exact search in the same session with index scans off. The data are
# deterministic: row n's vector is tvec(n, dims), a hash of n (so concurrent inserts that draw
# n from a sequence produce the same rows whatever their interleaving), and query q is
# tvec(-q, dims); builds are single-threaded.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TwoTower;

my $node = new_node('hnsw', conf => ["search_path = 'public, twotower'", 'twotower.build_threads = 1',
	'autovacuum = off', 'max_connections = 40']);
$node->safe_psql('postgres', q{
	CREATE FUNCTION tvec(n bigint, d int) RETURNS real[] LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
	$$ SELECT array_agg((hashint8(n * 4096 + j) / 2147483648.0)::real ORDER BY j) FROM generate_series(1, d) j $$;
});

my $INDEX = 'SET enable_seqscan = off; SET enable_bitmapscan = off;';
my $EXACT = 'SET enable_indexscan = off; SET enable_bitmapscan = off; SET enable_seqscan = on;';

# The top $k of queries 1 .. $nq (query q: tvec(-q, $dims)) over $table by $op, with an optional
# filter $where (may name the query vector q.v), after $settings. Through the index (its plan
# asserted) unless $exact. Returns { qid => [[id, distance], ...] } in the order returned.
sub knn
{
	my (%a) = @_;
	my ($table, $op, $k, $dims, $nq) = @a{qw(table op k dims nq)};
	my $where = $a{where} // 'true';
	my $sql = qq{
		WITH q AS MATERIALIZED (SELECT g AS qid, tvec(-g, $dims) AS v FROM generate_series(1, $nq) g)
		SELECT q.qid, coalesce((SELECT string_agg(s.id || ' ' || s.d, ',')
		    FROM (SELECT t.id, t.v $op q.v AS d FROM $table t WHERE $where ORDER BY t.v $op q.v LIMIT $k) s), '')
		  FROM q ORDER BY q.qid};
	my $settings = ($a{exact} ? $EXACT : $INDEX) . ($a{settings} // '');
	TwoTower::assert_index_plan($node, 'postgres', $settings, $sql) unless $a{exact};
	my %r;
	for my $line (split /\n/, $node->safe_psql('postgres', "$settings $sql"))
	{
		my ($qid, $rows) = split /\|/, $line, 2;
		$r{$qid} = [ map { [ split / / ] } grep { length } split /,/, ($rows // '') ];
	}
	return \%r;
}

# Fraction of the reference's ids that $got returns (over all queries).
sub recall_of
{
	my ($got, $want) = @_;
	my ($hit, $all) = (0, 0);
	for my $qid (keys %$want)
	{
		my %g = map { $_->[0] => 1 } @{ $got->{$qid} // [] };
		for my $row (@{ $want->{$qid} }) { $all++; $hit++ if $g{ $row->[0] }; }
	}
	return $all ? $hit / $all : 0;
}

# How many queries of $got have rows out of distance order.
sub out_of_order
{
	my ($got) = @_;
	return scalar grep {
		my $rows = $got->{$_};
		grep { $rows->[$_][1] < $rows->[ $_ - 1 ][1] } 1 .. $#$rows;
	} keys %$got;
}

# How many queries of $got return another number of rows than the reference $want.
sub short_answers
{
	my ($got, $want) = @_;
	return scalar grep { @{ $got->{$_} // [] } != @{ $want->{$_} } } keys %$want;
}

# The ids only, as one string per query.
sub ids
{
	my ($r) = @_;
	return { map { $_ => join(',', map { $_->[0] } @{ $r->{$_} }) } keys %$r };
}

# A table $table (id bigint, category int, v real[]) with rows n = 1 .. $n: category n % 50,
# vector tvec(n + $offset, $dims); further ids come from the sequence ${table}_seq.
sub make_table
{
	my ($table, $n, $dims, $offset) = @_;
	$offset //= 0;
	$node->safe_psql('postgres', qq{
		CREATE TABLE $table (id bigint PRIMARY KEY, category int, v real[]);
		CREATE SEQUENCE ${table}_seq;
		INSERT INTO $table SELECT n, n % 50, tvec(n + $offset, $dims)
		  FROM (SELECT nextval('${table}_seq') AS n FROM generate_series(1, $n)) s;
	});
}

# pgbench inserting rows of ${table}_seq ($rows a transaction) from $clients clients,
# $tx transactions each; checks that every transaction went through.
my $bench = 0;
sub concurrent_inserts
{
	my ($table, $dims, $clients, $tx, $rows, $offset, $what) = @_;
	$offset //= 0;
	$bench++;
	my $total = $clients * $tx;
	$node->pgbench("--no-vacuum --client=$clients --jobs=2 --transactions=$tx", 0,
		[qr/number of transactions actually processed: $total\/$total/, qr/number of failed transactions: 0/],
		[qr/^$/], $what,
		{ "017_insert_$bench.sql" => "INSERT INTO $table SELECT n, n % 50, tvec(n + $offset, $dims)
		    FROM (SELECT nextval('${table}_seq') AS n FROM generate_series(1, $rows)) s;" });
}

sub one { my ($sql) = @_; return $node->safe_psql('postgres', $sql); }

# Runs scenario $name; an error (a failed statement) fails it and goes on with the next one.
sub scenario
{
	my ($name, $code) = @_;
	subtest $name => sub {
		eval { $code->(); 1 } or fail("$name: $@");
	};
}

# The plan of $sql without hints (after $settings and ef_search 200), and its answer as planned
# and by exact search.
sub planned
{
	my ($sql, $settings) = @_;
	$settings = 'SET twotower.ef_search = 200; ' . ($settings // '');
	my $plan = one("$settings EXPLAIN (COSTS OFF) $sql");
	return ($plan, one("$settings $sql"), one("$settings $EXACT $sql"));
}

# Rows, distinct ids, copies among them, and whether distances never decrease, of one scan.
sub dup_scan
{
	my ($mode, $k, $query) = @_;
	my $sql = "SELECT id, category, v <-> $query AS d FROM dup ORDER BY v <-> $query LIMIT $k";
	my $settings = "$INDEX SET twotower.ef_search = 1; SET twotower.iterative_scan = $mode;";
	TwoTower::assert_index_plan($node, 'postgres', $settings, $sql);
	return one(qq{$settings
		SELECT count(*) || ' ' || count(DISTINCT id) || ' ' || count(*) FILTER (WHERE category = -1) || ' '
		       || coalesce(bool_and(ordered), true)
		  FROM (SELECT id, category, d >= lag(d, 1, '-Infinity') OVER (ORDER BY n) AS ordered
		          FROM (SELECT s.*, row_number() OVER () AS n FROM ($sql) s) s) s});
}

my $dims = 16;

# ---------------------------------------------------------------------------------------------
# 013: recall after concurrent inserts, for each operator class. 1000 rows at build, then 4
# clients insert 4000 more one row at a time (folding into the delta graph every 200 rows).
scenario('013: recall after concurrent inserts, per operator class' => sub {
	for my $c (['real_l2_ops', '<->'], ['real_ip_ops', '<#>'], ['real_cosine_ops', '<=>'])
	{
		my ($ops, $op) = @$c;
		my $t = 'ins_' . ($ops =~ s/^real_|_ops$//gr);
		make_table($t, 1000, $dims);
		one("CREATE INDEX ${t}_idx ON $t USING twotower_hnsw (v $ops) WITH (fold_threshold = 200)");
		concurrent_inserts($t, $dims, 4, 1000, 1, 0, "$ops: 4 clients insert 4000 rows");
		is(one("SELECT count(*) FROM $t"), '5000', "$ops: every insert committed");
		is(index_scan_count($node, 'postgres', $t, $op, $dims), '5000', "$ops: the index returns each of the 5000 rows once");
		is(one("SELECT graph_items + delta_items FROM index_info('${t}_idx')"), '5000', "$ops: and holds 5000 entries");
		my %q = (table => $t, op => "OPERATOR(public.$op)", k => 20, dims => $dims, nq => 30);
		my $r = recall_of(knn(%q), knn(%q, exact => 1));
		cmp_ok($r, '>=', 0.99, sprintf('%s: recall@20 after concurrent inserts %.4f', $ops, $r));
		one("DROP TABLE $t");
	}
});

# ---------------------------------------------------------------------------------------------
# 016: concurrent inserts into an empty index. First the race of the first rows (8 clients, one
# row each, five times over a truncated table), then 2000 rows in 10-row transactions that fold
# many times into a delta graph that starts from nothing.
scenario('016: concurrent inserts into an empty index' => sub {
	make_table('empty', 0, $dims);
	one('CREATE INDEX empty_idx ON empty USING twotower_hnsw (v) WITH (fold_threshold = 100)');
	is(one("SELECT cache_state FROM index_info('empty_idx')"), 'none (no graph yet)', 'the index on the empty table has no graph');
	my @first;
	for my $round (1 .. 5)
	{
		one('TRUNCATE empty');
		concurrent_inserts('empty', $dims, 8, 1, 1, 0, "round $round: 8 clients insert the first rows");
		push @first, index_scan_count($node, 'postgres', 'empty', '<=>', $dims);
	}
	is(join(',', @first), '8,8,8,8,8', 'each round: the index returns the 8 first rows');
	one('TRUNCATE empty');
	concurrent_inserts('empty', $dims, 4, 50, 10, 0, '4 clients insert 2000 rows into the empty index');
	is(index_scan_count($node, 'postgres', 'empty', '<=>', $dims), '2000', 'the index returns each of the 2000 rows once');
	cmp_ok(one("SELECT folds FROM index_info('empty_idx')"), '>', 1, 'the inserts folded into the delta graph');
	my $self_sql = 'SELECT count(*) FROM empty e WHERE (SELECT t.id FROM empty t ORDER BY t.v <=> e.v LIMIT 1) <> e.id';
	TwoTower::assert_index_plan($node, 'postgres', $INDEX, $self_sql);
	is(one("$INDEX $self_sql"), '0', 'every row is its own nearest neighbour through the index');
	{
		my %q = (table => 'empty', op => 'OPERATOR(public.<=>)', k => 20, dims => $dims, nq => 30);
		my $r = recall_of(knn(%q), knn(%q, exact => 1));
		cmp_ok($r, '>=', 0.99, sprintf('recall@20 after concurrent inserts into the empty index %.4f', $r));
	}
	one('DROP TABLE empty');
});

# ---------------------------------------------------------------------------------------------
# 015: duplicates. 200 copies of one vector among 2000 others at build, 64 more folded into the
# delta graph, 20 more waiting in the delta pages; at ef_search = 1 every LIMIT k still gets k
# rows, the copies first, none twice.
scenario('015: duplicates at ef_search = 1, concurrent duplicate inserts' => sub {
	make_table('dup', 2000, $dims);
	my $dupv = "array_fill(0.5::real, ARRAY[$dims])";
	one(qq{
		INSERT INTO dup SELECT nextval('dup_seq'), -1, $dupv FROM generate_series(1, 200);
		CREATE INDEX dup_idx ON dup USING twotower_hnsw (v real_l2_ops) WITH (fold_threshold = 64);
		INSERT INTO dup SELECT nextval('dup_seq'), -1, $dupv FROM generate_series(1, 64);
		INSERT INTO dup SELECT nextval('dup_seq'), -1, $dupv FROM generate_series(1, 20);
	});
	is(one("SELECT graph_items || ' ' || delta_graph_items || ' ' || delta_pending FROM index_info('dup_idx')"), '2200 64 20',
		'copies in the main graph, the delta graph and the delta pages');
	for my $mode ('strict_order', 'relaxed_order')
	{
		my @got = map { dup_scan($mode, $_, $dupv) } (2, 10, 100, 284, 294);
		my @other = map { dup_scan($mode, 10, "tvec(-$_, $dims)") } 1 .. 10;
		if ($mode eq 'strict_order')
		{
			is(join(' / ', @got), '2 2 2 true / 10 10 10 true / 100 100 100 true / 284 284 284 true / 294 294 284 true',
				"$mode, ef_search = 1: LIMIT 2/10/100/284/294 get that many rows, the 284 copies first, none twice");
			is(scalar(grep { /^10 10 \d+ true$/ } @other), 10,
				"$mode, ef_search = 1: LIMIT 10 for 10 other queries gets 10 rows in distance order")
				or diag(join(' / ', @other));
		}
		else
		{
			# (relaxed order: the rows of a widened search may come after farther ones)
			is(join(' / ', map { s/^(\d+ \d+).*/$1/r } @got), '2 2 / 10 10 / 100 100 / 284 284 / 294 294',
				"$mode, ef_search = 1: LIMIT 2/10/100/284/294 get that many rows, none twice");
			is(scalar(grep { /^10 10 / } @other), 10, "$mode, ef_search = 1: LIMIT 10 for 10 other queries gets 10 rows")
				or diag(join(' / ', @other));
		}
	}
	# Concurrent duplicate inserts (folding copies into the delta graph while other clients insert).
	$bench++;
	$node->pgbench('--no-vacuum --client=5 --jobs=2 --transactions=100', 0,
		[qr/number of transactions actually processed: 500\/500/], [qr/^$/], '5 clients insert 500 more copies',
		{ "017_dup_$bench.sql" => "INSERT INTO dup SELECT nextval('dup_seq'), -1, $dupv;" });
	is(index_scan_count($node, 'postgres', 'dup', '<->', $dims), '2784', 'the index returns each of the 2784 rows once');
	is(dup_scan('strict_order', 784, $dupv), '784 784 784 true', 'ef_search = 1: all 784 copies come back, none twice');
	is(dup_scan('strict_order', 794, $dupv), '794 794 784 true', 'and then the nearest other rows');
	one('DROP TABLE dup');
});

# ---------------------------------------------------------------------------------------------
# 017: the planner, without hints, on 5000 rows (50 categories), and the answers against exact
# search: a selective filter (2 %), a distance range, a LATERAL join, a partial index. The
# answers must equal exact search's: ef_search 200 (at 100, strict order misses 1 of the 100
# rows of the LATERAL join with a per-row 2 % filter: a nearer row that a widened search found
# after a farther one was returned).
scenario('017: planner: selective filter, distance range, LATERAL join, partial index' => sub {
	make_table('p', 5000, $dims, 100000);
	one(qq{
		CREATE INDEX p_idx ON p USING twotower_hnsw (v real_l2_ops);
		CREATE TABLE pq (qid int PRIMARY KEY, cat int, v real[]);
		INSERT INTO pq SELECT g, g % 50, tvec(-g, $dims) FROM generate_series(1, 20) g;
		ANALYZE p; ANALYZE pq;
	});
	my @qv = map { one("SELECT tvec(-$_, $dims)::text") } 1 .. 5;
	my (@plans, $eq, $n);

	# A selective filter: 2 % of the rows.
	($eq, $n) = (0, 0);
	for my $i (0 .. $#qv)
	{
		my ($plan, $got, $want) = planned("SELECT id FROM p WHERE category = 7 ORDER BY v <-> '$qv[$i]' LIMIT 10");
		push @plans, $plan;
		$n++ if $want =~ tr/\n// == 9;
		$eq++ if $got eq $want;
	}
	like($plans[0], qr/Index Scan using p_idx/, 'a 2 % filter with ORDER BY ... LIMIT uses the vector index');
	is("$eq $n", '5 5', 'and answers as exact search (5 queries, 10 rows each)');

	# A distance range: WHERE v <-> q < r ORDER BY v <-> q LIMIT k, with r the 6th distance (5 rows
	# qualify: the scan must go on past them and end with 5) and the 40th (more than k qualify).
	for my $nth (6, 40)
	{
		($eq, $n, @plans) = (0, 0);
		for my $i (0 .. $#qv)
		{
			my $r = one("$EXACT SELECT v <-> '$qv[$i]' FROM p ORDER BY 1 OFFSET " . ($nth - 1) . ' LIMIT 1');
			my ($plan, $got, $want) = planned(
				"SELECT id FROM p WHERE v <-> '$qv[$i]' < $r ORDER BY v <-> '$qv[$i]' LIMIT 10");
			push @plans, $plan;
			$n++ if $want =~ tr/\n// == ($nth > 10 ? 9 : $nth - 2);
			$eq++ if $got eq $want;
		}
		like($plans[0], qr/Index Scan using p_idx/, "a distance range (r = distance #$nth) with LIMIT uses the vector index");
		is("$eq $n", '5 5', "and answers as exact search (5 queries, " . ($nth > 10 ? 10 : $nth - 1) . ' rows each)');
	}
	# Without LIMIT an ordered scan would end at twotower.max_scan_tuples rows: 300 rows in range
	# must all come back (pgvector plans a sequential scan here).
	{
		my $r = one("$EXACT SELECT v <-> '$qv[0]' FROM p ORDER BY 1 OFFSET 299 LIMIT 1");
		my $sql = "SELECT id FROM p WHERE v <-> '$qv[0]' <= $r ORDER BY v <-> '$qv[0]'";
		my ($plan, $got, $want) = planned($sql, 'SET twotower.max_scan_tuples = 100;');
		is(($got =~ tr/\n//) + 1, 300, 'a distance range without LIMIT returns all 300 rows in range');
		is($got, $want, 'in the order of exact search');
	}

	# A LATERAL join: the top 5 for each row of a query table, with and without a per-row filter.
	for my $filter ('true', 'p.category = pq.cat')
	{
		my $sql = "SELECT pq.qid, s.id FROM pq CROSS JOIN LATERAL
		             (SELECT p.id, p.v <-> pq.v AS d FROM p WHERE $filter ORDER BY p.v <-> pq.v LIMIT 5) s
		           ORDER BY pq.qid, s.d, s.id";
		my ($plan, $got, $want) = planned($sql);
		like($plan, qr/Nested Loop.*Index Scan using p_idx on p/s, "LATERAL join ($filter): a nested loop over the vector index");
		is(($got =~ tr/\n//) + 1, 100, "LATERAL join ($filter): 5 rows for each of 20 queries");
		is($got, $want, "LATERAL join ($filter): the answers of exact search");
	}

	# A partial index on category 1, built on 100 rows; 500 rows inserted after it (10 of category
	# 1 go to its delta, the others nowhere).
	one(qq{
		CREATE INDEX p_part ON p USING twotower_hnsw (v real_l2_ops) WHERE category = 1;
		INSERT INTO p SELECT n, n % 50, tvec(n + 100000, $dims) FROM (SELECT nextval('p_seq') AS n FROM generate_series(1, 500)) s;
		ANALYZE p;
	});
	is(one("SELECT graph_items || ' ' || delta_items FROM index_info('p_part')"), '100 10',
		'the partial index holds the 100 rows of its predicate and the 10 inserted since');
	{
		my $all = "SELECT id FROM p WHERE category = 1 ORDER BY v <-> '$qv[0]' LIMIT 1000";
		my $s = "$INDEX SET twotower.iterative_scan = relaxed_order;";
		my $plan = one("$s EXPLAIN (COSTS OFF) $all");
		like($plan, qr/Index Scan using p_part/, 'a full scan of category 1 uses the partial index');
		is(one("$s SELECT string_agg(id::text, ',' ORDER BY id) FROM ($all) s"),
			one("$EXACT SELECT string_agg(id::text, ',' ORDER BY id) FROM p WHERE category = 1"),
			'and returns exactly the 110 rows of category 1');
	}
	for my $cat (1, 2)
	{
		($eq, $n, @plans) = (0, 0);
		for my $i (0 .. $#qv)
		{
			my ($plan, $got, $want) = planned("SELECT id FROM p WHERE category = $cat ORDER BY v <-> '$qv[$i]' LIMIT 10");
			push @plans, $plan;
			$n++ if $want =~ tr/\n// == 9;
			$eq++ if $got eq $want;
		}
		like($plans[0], $cat == 1 ? qr/Index Scan using p_part/ : qr/Index Scan using p_idx/,
			$cat == 1 ? 'category 1 uses the partial index' : 'category 2 uses the full index, not the partial one');
		is("$eq $n", '5 5', "category $cat: the answers of exact search (5 queries, 10 rows each)");
	}
	one('DROP TABLE p, pq');
});

# ---------------------------------------------------------------------------------------------
# 043/044: filtered recall at 2 % and 0.2 % of 10 000 rows, in strict and relaxed order.
scenario('043/044: filtered recall at 2 % and 0.2 %, strict and relaxed order' => sub {
	make_table('f', 10000, $dims, 200000);
	one('CREATE INDEX f_idx ON f USING twotower_hnsw (v)');
	for my $c (['2 %', 'id % 50 = 0'], ['0.2 %', 'id % 500 = 0'])
	{
		my ($sel, $where) = @$c;
		my %q = (table => 'f', op => 'OPERATOR(public.<=>)', k => 10, dims => $dims, nq => 20, where => "t.$where");
		my $want = knn(%q, exact => 1);
		for my $mode ('strict_order', 'relaxed_order')
		{
			my $got = knn(%q, settings => "SET twotower.iterative_scan = $mode;");
			my $r = recall_of($got, $want);
			cmp_ok($r, '>=', 0.99, sprintf('%s filter, %s: recall@10 %.4f', $sel, $mode, $r));
			is(short_answers($got, $want), 0, "$sel filter, $mode: every query gets 10 rows");
			is(out_of_order($got), 0, "$sel filter, strict_order: every answer in distance order") if $mode eq 'strict_order';
		}
	}
	one('DROP TABLE f');
});

# ---------------------------------------------------------------------------------------------
# 014: recall before VACUUM with a low m: 4000 rows of 8 dimensions, m = 4, ef_construction = 16,
# 75 % deleted and not yet vacuumed: the scan must get past the dead rows (at ef_search = 20 =
# LIMIT a single search finds about 5 live ones). pgvector asks 0.93 at ef_search 100 and, after
# VACUUM, 0.95 at ef_search = LIMIT; this graph reaches 0.997 at ef_search 100 before the deletes.
scenario('014: recall before VACUUM with m = 4' => sub {
	my $ldims = 8;
	make_table('lowm', 4000, $ldims, 300000);
	one(q{
		CREATE INDEX lowm_idx ON lowm USING twotower_hnsw (v real_l2_ops) WITH (m = 4, ef_construction = 16);
		DELETE FROM lowm WHERE id > 1000;
	});
	my %q = (table => 'lowm', op => 'OPERATOR(public.<->)', k => 20, dims => $ldims, nq => 30);
	my $want = knn(%q, exact => 1);
	for my $c ([20, 0.85], [100, 0.95])
	{
		my ($ef, $min) = @$c;
		my $got = knn(%q, settings => "SET twotower.ef_search = $ef;");
		my $r = recall_of($got, $want);
		cmp_ok($r, '>=', $min, sprintf('m = 4, 75 %% deleted, before VACUUM, ef_search = %d: recall@20 %.4f', $ef, $r));
		is(short_answers($got, $want), 0, "before VACUUM, ef_search = $ef: every query gets 20 rows");
		is(out_of_order($got), 0, "before VACUUM, ef_search = $ef: every answer in distance order");
	}
	one('VACUUM lowm');
	is(one("SELECT graph_dead FROM index_info('lowm_idx')"), '3000', 'VACUUM marks the 3000 deleted rows dead in the graph');
	is(index_scan_count($node, 'postgres', 'lowm', '<->', $ldims), '1000', 'the index returns the 1000 live rows once');
	for my $c ([20, 0.95], [100, 0.99])
	{
		my ($ef, $min) = @$c;
		my $r = recall_of(knn(%q, settings => "SET twotower.ef_search = $ef;"), $want);
		cmp_ok($r, '>=', $min, sprintf('after VACUUM, ef_search = %d: recall@20 %.4f', $ef, $r));
	}
	one('DROP TABLE lowm');
});

# ---------------------------------------------------------------------------------------------
# 011: the index size over cycles of delete-all, VACUUM and re-inserting the same 3000 vectors.
scenario('011: index size over delete-all / VACUUM / re-insert cycles' => sub {
	make_table('cyc', 3000, $dims, 400000);
	one('CREATE INDEX cyc_idx ON cyc USING twotower_hnsw (v real_l2_ops)');
	my @size = (one("SELECT pg_relation_size('cyc_idx')"));
	for my $cycle (1 .. 4)
	{
		one('DELETE FROM cyc; VACUUM cyc;');
		# VACUUM retires a graph with nothing live in it: its pages are free for what comes
		# next, and no scan walks through 3000 dead entries.
		is(one(q{SELECT concat_ws(' ', graph_items, graph_dead, delta_graph_items, delta_pending) FROM index_info('cyc_idx')}),
			'0 0 0 0', "cycle $cycle: after delete-all and VACUUM the index holds nothing");
		is(index_scan_count($node, 'postgres', 'cyc', '<->', $dims), '0', "cycle $cycle: a scan of the emptied index returns nothing");
		one(qq{
			INSERT INTO cyc SELECT n, n % 50, tvec((n - 1) % 3000 + 1 + 400000, $dims)
			  FROM (SELECT nextval('cyc_seq') AS n FROM generate_series(1, 3000)) s;
		});
		push @size, one("SELECT pg_relation_size('cyc_idx')");
	}
	note('index size after the build and after each cycle: ' . join(', ', @size));
	note('index_info after the cycles (graph_items, graph_dead, delta_graph_items, delta_pending): '
		  . one("SELECT concat_ws(', ', graph_items, graph_dead, delta_graph_items, delta_pending) FROM index_info('cyc_idx')"));
	is(index_scan_count($node, 'postgres', 'cyc', '<->', $dims), '3000', 'after the cycles the index returns the 3000 live rows once');
	{
		my %q = (table => 'cyc', op => 'OPERATOR(public.<->)', k => 10, dims => $dims, nq => 20);
		my $r = recall_of(knn(%q), knn(%q, exact => 1));
		cmp_ok($r, '>=', 0.99, sprintf('after the cycles: recall@10 %.4f', $r));
	}
	cmp_ok($size[4], '<=', $size[1] * 1.1,
		"the index does not grow from cycle to cycle ($size[1] bytes after the first, $size[4] after the fourth)");
	# VACUUM retires the dead graph and its pages are reused (2.74x the build before it did, 1.75x
	# since); the rest is the delta graph's two chains: a fold writes the new graph over the
	# spare (the graph before the current one) and keeps the current one as the next spare, so
	# the index holds room for both.
	cmp_ok($size[4], '<=', $size[0] * 2,
		"the same 3000 rows take at most twice the space of the build ($size[0] bytes after the build, $size[4] after four cycles)");
	TODO:
	{
		local $TODO = 'a fold keeps two delta graphs (the current one and the spare it writes the next one '
		  . 'over, so that WAL carries only the changes): the re-inserted rows take room for two graphs';
		cmp_ok($size[4], '<=', $size[0] * 1.1,
			"the same 3000 rows take about the space of the build ($size[0] bytes after the build, $size[4] after four cycles)");
	}
	one('DROP TABLE cyc');
});

# ---------------------------------------------------------------------------------------------
# 046: VACUUM as one weighted script of a pgbench run among ordered SELECTs (each checking its own
# answer: 10 rows in distance order, or an error), INSERTs and DELETEs; afterwards the index
# answers as exact search.
scenario('046: VACUUM as a weighted pgbench script among SELECT, INSERT, DELETE' => sub {
	make_table('vc', 3000, $dims, 500000);
	one(qq{
		CREATE INDEX vc_idx ON vc USING twotower_hnsw (v real_l2_ops) WITH (fold_threshold = 100);
		CREATE FUNCTION check_scan(q int) RETURNS int LANGUAGE plpgsql AS \$\$
		DECLARE r record; prev float8 := '-Infinity'; n int := 0;
		BEGIN
			FOR r IN SELECT v <-> tvec(-q, $dims) AS d FROM vc ORDER BY v <-> tvec(-q, $dims) LIMIT 10 LOOP
				IF r.d < prev THEN RAISE EXCEPTION 'query %: row % nearer than the row before it', q, n + 1; END IF;
				prev := r.d; n := n + 1;
			END LOOP;
			IF n <> 10 THEN RAISE EXCEPTION 'query %: % rows instead of 10', q, n; END IF;
			RETURN n;
		END \$\$;
	});
	TwoTower::assert_index_plan($node, 'postgres', $INDEX,
		"SELECT v <-> tvec(-1, $dims) AS d FROM vc ORDER BY v <-> tvec(-1, $dims) LIMIT 10");
	my ($out, $err);
	{
		my $dir = PostgreSQL::Test::Utils::tempdir;
		my %s = (
			'select' => "SET enable_seqscan = off;\n\\set q random(1, 50)\nSELECT check_scan(:q);\n",
			'insert' => "INSERT INTO vc SELECT n, n % 50, tvec(n + 500000, $dims) FROM nextval('vc_seq') n;\n",
			'delete' => "\\set id random(1, 4000)\nDELETE FROM vc WHERE id = :id;\n",
			'vacuum' => "VACUUM vc;\n");
		for my $f (keys %s) { open(my $fh, '>', "$dir/$f.sql") or die; print $fh $s{$f}; close $fh; }
		my @cmd = ('pgbench', '-n', '-c', '4', '-j', '2', '-t', '250', '--random-seed=17',
			'-f', "$dir/select.sql\@10", '-f', "$dir/insert.sql\@4", '-f', "$dir/delete.sql\@4", '-f', "$dir/vacuum.sql\@1",
			'-h', $node->host, '-p', $node->port, 'postgres');
		my $ok = IPC::Run::run(\@cmd, '>', \$out, '2>', \$err);
		ok($ok, 'the SELECT / INSERT / DELETE / VACUUM run exits 0') or diag($err);
	}
	like($out, qr/number of transactions actually processed: 1000\/1000/, 'all 1000 transactions went through');
	is(join('', grep { !/^pgbench: setting random seed/ } split /^/m, $err), '',
		'no client reported an error (every SELECT got 10 rows in distance order)');
	my ($vacuums) = $out =~ /vacuum\.sql\s*\n\s*- weight: 1[^\n]*\n\s*- (\d+) transactions/;
	cmp_ok($vacuums // 0, '>=', 10, 'VACUUM ran ' . ($vacuums // 0) . ' times among them');
	is(index_scan_count($node, 'postgres', 'vc', '<->', $dims), one('SELECT count(*) FROM vc'),
		'afterwards the index returns each live row once');
	{
		my %q = (table => 'vc', op => 'OPERATOR(public.<->)', k => 10, dims => $dims, nq => 30);
		my $want = knn(%q, exact => 1);
		my $got = knn(%q);
		my $r = recall_of($got, $want);
		cmp_ok($r, '>=', 0.99, sprintf('afterwards recall@10 %.4f', $r));
		is_deeply(ids(knn(%q, settings => 'SET twotower.ef_search = 400;')), ids($want),
			'afterwards at ef_search = 400 the index answers exactly as exact search (30 queries)');
	}
});

my $log = slurp_file($node->logfile);
unlike($log, qr/PANIC|TRAP|terminated by signal/, 'no backend crashed');
$node->stop;
done_testing();
