# The upgrade path: a database created at 0.1.0 (from the released script, with an index and
# models in the 0.1.0 catalogue layout) is updated with ALTER EXTENSION ... UPDATE and then
# answers exactly like a fresh install of the current version; its SQL objects are the same.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use TwoTower;

my $g = $ENV{TT_GOLDEN};
my $node = new_node('upgrade', dbs => []);
my $current = $node->safe_psql('postgres',
	q{SELECT default_version FROM pg_available_extensions WHERE name = 'pg_twotower'});
isnt($current, '0.1.0', "the current version ($current) is newer than 0.1.0");

$node->safe_psql('postgres', q{
	CREATE ROLE carol LOGIN; CREATE ROLE erin LOGIN;
	CREATE DATABASE up; CREATE DATABASE fresh;
});
$node->safe_psql('up', q{CREATE EXTENSION pg_twotower VERSION '0.1.0'});
$node->safe_psql('fresh', q{CREATE EXTENSION pg_twotower});
is($node->safe_psql('up', q{SELECT extversion FROM pg_extension WHERE extname = 'pg_twotower'}),
	'0.1.0', 'installed at 0.1.0 from its script');

for my $db ('up', 'fresh')
{
	make_items($node, $db, 'items', 3000, 8);
	$node->safe_psql($db, q{
		CREATE INDEX items_idx ON items USING twotower_hnsw (v) WITH (m = 12, ef_construction = 64);
		GRANT twotower_admin TO carol;
	});
}
# Models as 0.1.0 stored them (its library is gone: the rows are written as it wrote them):
# owner by name; one model whose owner role has since been dropped.
$node->safe_psql('up', qq{
	INSERT INTO twotower.model (name, owner, active_version, next_version)
	VALUES ('u', 'carol', 1, 3), ('orphan', 'nobody_any_more', 1, 2);
	INSERT INTO twotower.model_version
	     (model, version, kind, dim, metric, parameters, checksum, spec, weights, imported_by)
	SELECT m, v, 'user', 8, 'cosine', 0, v,
	       pg_read_file('$g/spec.json')::jsonb, pg_read_binary_file('$g/weights.safetensors'), 'carol'
	  FROM (VALUES ('u', 1), ('u', 2), ('orphan', 1)) AS x(m, v);
});
# carol may not read server files: the superuser imports, then hands the model over.
$node->safe_psql('fresh', qq{
	SELECT twotower.import_model_file('u', '$g/spec.json', '$g/weights.safetensors');
	SELECT twotower.import_model_file('u', '$g/spec.json', '$g/weights.safetensors', false);
	SELECT twotower.alter_model_owner('u', 'carol');
});

# Before 0.8.0 the operators were in schema twotower; from 0.8.0 on they are in the
# extension's schema (public), where the same query text finds them in any session.
my $query_for = sub {
	my ($op) = @_;
	return qq{SET enable_seqscan = off;
	SELECT string_agg(id::text, ',') FROM (SELECT id FROM items
	 ORDER BY v $op (SELECT v FROM items WHERE id = 7) LIMIT 10) s};
};
my $query = $query_for->('<=>');
my $before = $node->safe_psql('up', $query_for->('OPERATOR(twotower.<=>)'));
like($before, qr/^7,/, 'the 0.1.0 index answers');

# Before the update the new library refuses the old catalogue with a clear error.
my ($rc, $out, $err) = $node->psql('up', q{SELECT twotower.embed_user('u', '{}')});
like($err, qr/SQL objects are at version 0\.1\.0.*\n.*\n.*ALTER EXTENSION pg_twotower UPDATE/s,
	'model functions before the update name the fix');

($rc, $out, $err) = $node->psql('up', 'ALTER EXTENSION pg_twotower UPDATE');
is($rc, 0, 'ALTER EXTENSION pg_twotower UPDATE');
like($err, qr/model "orphan": its owner role "nobody_any_more" no longer exists/,
	'a model whose owner role is gone is named');
is($node->safe_psql('up', q{SELECT extversion FROM pg_extension WHERE extname = 'pg_twotower'}),
	$current, "updated to $current");

# Same objects: functions (definitions, volatility, strictness, parallel safety, ACLs),
# tables (columns, defaults, constraints), views, operators, operator classes, comments.
my $describe = q{
	WITH ext AS (SELECT oid FROM pg_extension WHERE extname = 'pg_twotower'),
	members AS (SELECT classid, objid FROM pg_depend, ext
	             WHERE refclassid = 'pg_extension'::regclass AND refobjid = ext.oid AND deptype = 'e')
	SELECT string_agg(d, E'\n' ORDER BY d) FROM (
	  SELECT 'function ' || p.oid::regprocedure || ' ' || pg_get_function_result(p.oid) || ' '
	         || p.provolatile::text || p.proisstrict::text || p.proparallel::text || ' ' || coalesce(p.proacl::text, '')
	         || ' ' || coalesce(obj_description(p.oid, 'pg_proc'), '')
	         || ' ' || pg_get_function_arguments(p.oid) AS d
	    FROM members m JOIN pg_proc p ON m.classid = 'pg_proc'::regclass AND p.oid = m.objid
	  UNION ALL
	  SELECT 'column ' || c.oid::regclass || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
	         || ' ' || a.attnotnull::text || ' ' || coalesce(pg_get_expr(ad.adbin, ad.adrelid), '')
	         || ' ' || a.attstorage::text
	    FROM members m JOIN pg_class c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid
	    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
	    LEFT JOIN pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
	  UNION ALL
	  SELECT 'relation ' || c.oid::regclass || ' ' || c.relkind::text || ' ' || coalesce(c.relacl::text, '')
	         || ' ' || coalesce(obj_description(c.oid, 'pg_class'), '')
	         || ' ' || coalesce(pg_get_viewdef(c.oid), '')
	    FROM members m JOIN pg_class c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid
	  UNION ALL
	  SELECT 'constraint ' || co.conrelid::regclass || ' ' || co.conname || ' ' || pg_get_constraintdef(co.oid)
	    FROM members m JOIN pg_constraint co ON m.classid = 'pg_class'::regclass AND co.conrelid = m.objid
	  UNION ALL
	  SELECT 'operator ' || o.oprnamespace::regnamespace || '.' || o.oid::regoperator FROM members m JOIN pg_operator o
	      ON m.classid = 'pg_operator'::regclass AND o.oid = m.objid
	  UNION ALL
	  SELECT 'opclass ' || oc.opcnamespace::regnamespace || '.' || oc.opcname || ' ' || oc.opcdefault::text
	         || ' ' || (SELECT opf.opfnamespace::regnamespace || '.' || opf.opfname FROM pg_opfamily opf WHERE opf.oid = oc.opcfamily)
	    FROM members m JOIN pg_opclass oc ON m.classid = 'pg_opclass'::regclass AND oc.oid = m.objid
	  UNION ALL
	  SELECT 'event trigger ' || e.evtname || ' ' || e.evtevent || ' ' || e.evtfoid::regproc || ' '
	         || coalesce(e.evttags::text, '') || ' ' || e.evtenabled::text
	    FROM members m JOIN pg_event_trigger e ON m.classid = 'pg_event_trigger'::regclass AND e.oid = m.objid
	  UNION ALL
	  SELECT 'config ' || extconfig::regclass[]::text FROM pg_extension WHERE extname = 'pg_twotower'
	) x};
my $want = $node->safe_psql('fresh', $describe);
like($want, qr/function twotower\.export_model/, 'the description lists the current functions');
like($want, qr/operator public\.<=>\(real\[\],real\[\]\)/, 'the operators are in the extension\'s schema');
like($want, qr/opclass public\.real_cosine_ops true public\.real_cosine_ops/, 'so are the operator classes and their families');
like($want, qr/event trigger twotower_drop_guard ddl_command_start/, 'the description lists the event triggers');
is($node->safe_psql('up', $describe), $want, 'the updated SQL objects equal a fresh install');
# The last released version's own script, updated, too.
$node->safe_psql('postgres', 'CREATE DATABASE up030');
$node->safe_psql('up030', q{CREATE EXTENSION pg_twotower VERSION '0.3.0'});
$node->safe_psql('up030', 'ALTER EXTENSION pg_twotower UPDATE');
is($node->safe_psql('up030', $describe), $want, 'a 0.3.0 install updated equals a fresh install');
$node->safe_psql('postgres', 'CREATE DATABASE up040');
$node->safe_psql('up040', q{CREATE EXTENSION pg_twotower VERSION '0.4.0'});
$node->safe_psql('up040', 'ALTER EXTENSION pg_twotower UPDATE');
is($node->safe_psql('up040', $describe), $want, 'a 0.4.0 install updated equals a fresh install');
$node->safe_psql('postgres', 'CREATE DATABASE up050');
$node->safe_psql('up050', q{CREATE EXTENSION pg_twotower VERSION '0.5.0'});
$node->safe_psql('up050', 'ALTER EXTENSION pg_twotower UPDATE');
is($node->safe_psql('up050', $describe), $want, 'a 0.5.0 install updated equals a fresh install');
$node->safe_psql('postgres', 'CREATE DATABASE up060');
$node->safe_psql('up060', q{CREATE EXTENSION pg_twotower VERSION '0.6.0'});
$node->safe_psql('up060', 'ALTER EXTENSION pg_twotower UPDATE');
is($node->safe_psql('up060', $describe), $want, 'a 0.6.0 install updated equals a fresh install');
# 0.7.0 (installed through 0.6.0 and its update script), with a channel, an item-cached
# partitioned table and a model used by another role: the update moves the operators, keeps
# the model usable, puts the cache trigger on every partition.
$node->safe_psql('postgres', 'CREATE DATABASE up070');
$node->safe_psql('up070', q{CREATE EXTENSION pg_twotower VERSION '0.7.0'});
$node->safe_psql('up070', q{
	CREATE TABLE pf (id bigint, embedding real[]) PARTITION BY RANGE (id);
	CREATE TABLE pf_1 PARTITION OF pf FOR VALUES FROM (0) TO (100);
	SELECT twotower.enable_item_cache('pf');
	CREATE TABLE v7 (id bigint PRIMARY KEY, v real[]);
	INSERT INTO v7 SELECT i, ARRAY[sin(i), cos(i)]::real[] FROM generate_series(1, 200) i;
	CREATE INDEX v7_idx ON v7 USING twotower_hnsw (v twotower.real_l2_ops);
});
$node->safe_psql('up070', 'ALTER EXTENSION pg_twotower UPDATE');
is($node->safe_psql('up070', $describe), $want, 'a 0.7.0 install updated equals a fresh install');
# recommend is created anew by the 0.8.0 update (a new argument): a DBA's REVOKE from PUBLIC
# and GRANTs carry over.
$node->safe_psql('postgres', 'CREATE DATABASE up070acl');
$node->safe_psql('up070acl', q{
	CREATE EXTENSION pg_twotower VERSION '0.7.0';
	CREATE ROLE up_app;
	CREATE ROLE up_other;
	REVOKE EXECUTE ON FUNCTION twotower.recommend(text, jsonb, integer, bigint[]) FROM PUBLIC;
	GRANT EXECUTE ON FUNCTION twotower.recommend(text, jsonb, integer, bigint[]) TO up_app;
	REVOKE EXECUTE ON FUNCTION twotower.recommend_explain(text, jsonb, integer, bigint[]) FROM PUBLIC;
	GRANT EXECUTE ON FUNCTION twotower.recommend_explain(text, jsonb, integer, bigint[]) TO up_other WITH GRANT OPTION;
});
$node->safe_psql('up070acl', 'ALTER EXTENSION pg_twotower UPDATE');
# recommend_explain too (a new scores column).
is($node->safe_psql('up070acl', q{
	SELECT has_function_privilege('up_app', 'twotower.recommend_explain(text, jsonb, integer, bigint[])', 'EXECUTE')
	       || ',' || has_function_privilege('up_other', 'twotower.recommend_explain(text, jsonb, integer, bigint[])', 'EXECUTE WITH GRANT OPTION')
	       || ',' || (SELECT string_agg(parameter_name, ',' ORDER BY ordinal_position) FROM information_schema.parameters p
	                   JOIN information_schema.routines r USING (specific_name)
	                  WHERE r.routine_name = 'recommend_explain' AND p.parameter_mode = 'OUT')}),
	'false,true,step,stage,received,kept,ms,kept_items,dropped_items,scores',
	"the update keeps recommend_explain's privileges and adds its scores column");
# Without a DBA's change, PUBLIC keeps EXECUTE on both (the default ACL is left as it is).
is($node->safe_psql('up070', q{
	SELECT has_function_privilege('up_other', 'twotower.recommend_explain(text, jsonb, integer, bigint[])', 'EXECUTE')
	       || ',' || has_function_privilege('up_other', 'twotower.recommend(text, jsonb, integer, bigint[], text)', 'EXECUTE')}),
	'true,true', 'an updated default ACL still lets PUBLIC execute recommend and recommend_explain');
is($node->safe_psql('up070acl', q{
	SELECT has_function_privilege('up_app', 'twotower.recommend(text, jsonb, integer, bigint[], text)', 'EXECUTE')
	       || ',' || has_function_privilege('up_other', 'twotower.recommend(text, jsonb, integer, bigint[], text)', 'EXECUTE')}),
	'true,false', "the update keeps recommend's privileges");
is($node->safe_psql('up070', q{SELECT string_agg(tgrelid::regclass::text, ',' ORDER BY tgrelid::regclass::text)
	FROM pg_trigger WHERE tgname = 'twotower_item_cache'}), 'pf,pf_1', 'the update puts the cache trigger on the partitions');
is($node->safe_psql('up070', q{SET enable_seqscan = off;
	SELECT string_agg(id::text, ',') FROM (SELECT id FROM v7 ORDER BY v <-> '{1, 0}' LIMIT 3) s}),
	$node->safe_psql('up070', q{SET enable_indexscan = off; SET enable_bitmapscan = off;
	SELECT string_agg(id::text, ',') FROM (SELECT id FROM v7 ORDER BY twotower.l2_distance(v, '{1, 0}'), id LIMIT 3) s}),
	'an index made at 0.7.0 answers the unqualified operator after the update');

# Same answers.
is($node->safe_psql('up', $query), $before, 'the index answers the same after the update');
my $embed = q{SELECT string_agg(twotower.embed_user('u', x)::text, ' ' ORDER BY n)
	FROM jsonb_array_elements('[{"user_id": 42, "history": [1001, 1002]}, {"country": "fr"}, {}]') WITH ORDINALITY AS a(x, n)};
is($node->safe_psql('up', $embed), $node->safe_psql('fresh', $embed), 'updated models embed users as a fresh import does');
my $models = q{SELECT string_agg(name || ':' || version || ':' || active || ':' || coalesce(owner::text, '-')
	|| ':' || unknown_features, ' ' ORDER BY name, version) FROM twotower.models};
is($node->safe_psql('up', $models), 'orphan:1:true:-:error u:1:true:carol:error u:2:false:carol:error',
	'owners carried over by role; the orphan has none');

# The owner is now the role, not its name.
($rc, $out, $err) = $node->psql('postgres', 'DROP ROLE carol');
like($err, qr/role "carol" cannot be dropped because some objects depend on it/, 'DROP ROLE refused while it owns models');
$node->safe_psql('postgres', 'ALTER ROLE carol RENAME TO carol2; CREATE ROLE carol LOGIN');
$node->safe_psql('up', 'GRANT twotower_admin TO carol2');
is($node->safe_psql('up', q{SELECT DISTINCT owner FROM twotower.models WHERE name = 'u'}), 'carol2',
	'a rename is followed');
($rc, $out, $err) = $node->psql('up', q{SET ROLE carol; SELECT twotower.drop_model('u')});
like($err, qr/permission denied to manage model "u"/, 'a new role with the old name owns nothing');
# The orphan is managed by admins only; an admin gives it an owner.
($rc, $out, $err) = $node->psql('up', q{SET ROLE erin; SELECT twotower.activate_model('orphan', 1)});
like($err, qr/permission denied to manage model "orphan"/, 'nobody but admins manages an ownerless model');
$node->safe_psql('up', q{SELECT twotower.alter_model_owner('orphan', 'erin')});
is($node->safe_psql('up', q{SELECT DISTINCT owner FROM twotower.models WHERE name = 'orphan'}), 'erin',
	'alter_model_owner gives an ownerless model an owner');
($rc, $out, $err) = $node->psql('up', q{SET ROLE erin; SELECT twotower.activate_model('orphan', 1)});
is($rc, 0, 'and its new owner manages it') or diag($err);

# DROP EXTENSION refuses while models exist (the index, which would also stop it, is dropped).
$node->safe_psql('up', 'DROP INDEX items_idx');
($rc, $out, $err) = $node->psql('up', 'DROP EXTENSION pg_twotower');
like($err, qr/cannot drop extension pg_twotower because its catalogue holds 2 models/,
	'DROP EXTENSION refuses while models exist');
$node->safe_psql('up', q{SELECT twotower.drop_model('u'); SELECT twotower.drop_model('orphan');});
is($node->safe_psql('up', q{SELECT count(*) FROM pg_largeobject_metadata}), '0',
	'drop_model removes the owner objects');
$node->safe_psql('up', 'DROP EXTENSION pg_twotower CASCADE');
# carol2 (carol renamed) still owns model u in database fresh: refused until that one is dropped.
($rc, $out, $err) = $node->psql('postgres', 'DROP ROLE carol2');
like($err, qr/role "carol2" cannot be dropped because some objects depend on it/, 'DROP ROLE refused while its model in another database exists');
$node->safe_psql('fresh', q{SELECT twotower.drop_model('u')});
($rc, $out, $err) = $node->psql('postgres', 'DROP ROLE carol2');
is($rc, 0, 'with the models dropped, DROP ROLE of their owner succeeds') or diag($err);
$node->safe_psql('postgres', 'DROP ROLE carol');

$node->stop;
done_testing();
