# The pre-ranker's hot-item cache is per backend: a change committed by another session, on the
# primary or replayed on a standby, empties it, so a session that cached the items answers like
# a new session; without the trigger nothing is cached.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TwoTower;

my $primary = new_node('cache', init => { allows_streaming => 1 });
$primary->backup('b0');
my $standby = PostgreSQL::Test::Cluster->new('cache_standby');
$standby->init_from_backup($primary, 'b0', has_streaming => 1);
$standby->start;

# A user tower whose vector is the request's q; a pre-rank model: score + 0.5 · price.
$primary->safe_psql('postgres', q{
CREATE FUNCTION st(h text, d bytea) RETURNS bytea LANGUAGE sql AS $$
    SELECT set_byte(set_byte('\x0000000000000000'::bytea, 0, length(convert_to(h, 'UTF8')) % 256), 1,
                    length(convert_to(h, 'UTF8')) / 256) || convert_to(h, 'UTF8') || d $$;
SELECT twotower.import_model('u', '{"format": "pg_twotower.tower", "spec_version": 1, "kind": "user",
  "features": [{"name": "q", "type": "dense", "dim": 2}], "layers": [], "output": {"dim": 2, "metric": "ip"}}',
  st('{}', ''));
SELECT twotower.import_model('p', '{"format": "pg_twotower.tower", "spec_version": 1, "kind": "prerank",
  "features": [{"name": "tt", "type": "cross", "of": "score"},
               {"name": "price", "source": "item", "type": "numeric", "transform": "none"}],
  "layers": [{"type": "linear", "weight": "w"}], "output": {"dim": 1}}',
  st('{"w":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]}}', '\x0000803f0000003f'));
CREATE TABLE items (id bigint PRIMARY KEY, embedding real[], price real);
INSERT INTO items SELECT i, ARRAY[cos(i), sin(i)]::real[], 0 FROM generate_series(1, 200) i;
CREATE INDEX items_idx ON items USING twotower_hnsw (embedding real_ip_ops);
SELECT twotower.save_pipeline('f', '{"user_model": "u", "vectors": {"table": "items"},
  "item_features": {"table": "items"},
  "channels": [{"type": "twotower", "index": "items_idx", "k": 100}],
  "stages": [{"type": "model", "model": "p", "keep": 10}], "k": 5}');
SELECT twotower.enable_item_cache('items');
});
my $rec = q{SELECT string_agg(item_id || ':' || round(score::numeric, 4), ',' ORDER BY rank)
	FROM twotower.recommend('f', '{"q": [1, 0]}')};
my $entries = q{SELECT entries FROM twotower.item_cache_info()};

my $bg = $primary->background_psql('postgres');
my $before = $bg->query_safe($rec);
ok($bg->query_safe($entries) > 0, 'the session cached the items');
is($bg->query_safe($rec), $before, 'from the cache: the same answer');

# Another session raises the price of an item outside the top 5 so that it leads.
my $outside = $primary->safe_psql('postgres', q{SELECT item_id FROM twotower.recommend('f', '{"q": [1, 0]}', k => 10) WHERE rank = 8});
$primary->safe_psql('postgres', "UPDATE items SET price = 100 WHERE id = $outside");
my $fresh = $primary->safe_psql('postgres', $rec);
like($fresh, qr/^$outside:/, 'a new session sees the change');
is($bg->query_safe($rec), $fresh, 'the caching session sees the change committed by another');
# A vector change too.
$primary->safe_psql('postgres', "UPDATE items SET embedding = ARRAY[80, 0]::real[] WHERE id = 3");
$fresh = $primary->safe_psql('postgres', $rec);
like($fresh, qr/^3:/, 'the new vector leads');
is($bg->query_safe($rec), $fresh, 'the caching session sees the new vector');
# A rolled-back change in another session changes nothing.
$primary->safe_psql('postgres', 'BEGIN; UPDATE items SET price = 1000 WHERE id = 9; ROLLBACK');
is($bg->query_safe($rec), $fresh, 'a rolled-back change is not seen');

# The standby: a session caches, the primary changes, the replayed commit empties the cache.
$primary->wait_for_catchup($standby);
my $sbg = $standby->background_psql('postgres');
is($sbg->query_safe($rec), $fresh, 'the standby answers like the primary');
ok($sbg->query_safe($entries) > 0, 'the standby session cached the items');
$primary->safe_psql('postgres', "UPDATE items SET price = 300 WHERE id = 88");
$fresh = $primary->safe_psql('postgres', $rec);
like($fresh, qr/^88:/, 'the price change leads on the primary');
$primary->wait_for_catchup($standby);
is($sbg->query_safe($rec), $fresh, 'the caching standby session sees the replayed change');

# Without the trigger nothing is cached.
$primary->safe_psql('postgres', q{SELECT twotower.disable_item_cache('items')});
is($bg->query_safe("$rec; $entries") =~ s/.*\n//sr, '0', 'no trigger: nothing cached');
$bg->quit;
$sbg->quit;
$standby->stop;
$primary->stop;
done_testing();
