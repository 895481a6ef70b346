-- Distance operators and input checks on real[].
CREATE EXTENSION pg_twotower;
SET search_path = public, twotower;

SELECT ARRAY[1,0,0]::real[] <=> ARRAY[0,1,0]::real[] AS cosine,
       ARRAY[1,2,3]::real[] <#> ARRAY[4,5,6]::real[] AS neg_ip,
       ARRAY[0,0]::real[] <-> ARRAY[3,4]::real[] AS l2;
SELECT inner_product(ARRAY[1,2]::real[], ARRAY[3,4]::real[]),
       round(vector_norm(ARRAY[3,4]::real[])::numeric, 6),
       l2_normalize(ARRAY[3,4]::real[]),
       vector_dims(ARRAY[1,2,3,4]::real[]);
SELECT ARRAY[0,0]::real[] <=> ARRAY[1,1]::real[] AS zero_vector_cosine;
SELECT NULL::real[] <=> ARRAY[1]::real[] AS null_is_null;

-- Every bad input is an ERROR with a SQLSTATE, never a crash.
SELECT ARRAY[1,2]::real[] <=> ARRAY[1,2,3]::real[];
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ARRAY[1,'NaN']::real[] <-> ARRAY[1,2]::real[];
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ARRAY[1,'-Infinity']::real[] <#> ARRAY[1,2]::real[];
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ARRAY[1,NULL]::real[] <=> ARRAY[1,2]::real[];
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ARRAY[[1,2],[3,4]]::real[] <=> ARRAY[[1,2],[3,4]]::real[];
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT '{}'::real[] <-> '{}'::real[];
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT vector_dims(array_fill(1::real, ARRAY[16001]));
\echo SQLSTATE :LAST_ERROR_SQLSTATE
