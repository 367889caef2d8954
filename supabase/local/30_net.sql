-- pg_net's SQL API (schema net), as pg_net 0.20.4 installs it (sql/pg_net.sql; no SQL changes
-- since 0.19.3), for servers where the extension is not available. Runs as supabase_admin in the
-- base template, so everything here is owned by supabase_admin as on Supabase.
--
-- Same objects, signatures, defaults, volatility and grants as the extension. What differs, and
-- why:
-- * pg_net's C functions are written in PL/pgSQL: _urlencode_string escapes like curl_escape;
--   _encode_url_with_params_array parses and normalises the URL like curl's URL API and raises
--   the same 'invalid URL "...": <curl message>' errors.
-- * net.wake() cannot register a commit callback from SQL; it sends a NOTIFY instead, which
--   PostgreSQL delivers only when the transaction commits (and drops on rollback). The local
--   worker (service/runtime/networker.py) listens per database. One consequence: a transaction
--   that called a request function cannot be PREPAREd (pg_net allows it and just does not wake).
-- * worker_restart() and the worker checks talk to that local worker, which is a client
--   connection named 'pg_net <version>' rather than a background worker. It connects as postgres
--   (pg_net.username on Supabase), so it has postgres's privileges and no more.
-- * The worker takes a batch off the queue in its own transaction and commits before sending, and
--   writes the responses in another transaction: killed mid-batch it loses the batch and never
--   sends it twice. pg_net keeps one transaction around the batch, but its crash takes the
--   postmaster through crash recovery, which empties these unlogged tables: a loss too.
-- * pg_stat_activity: pg_net's background worker shows 'active'; the local worker is a client
--   session, 'active' while it runs a statement and 'idle' between them (waiting for a wake or
--   for HTTP replies), never 'idle in transaction'.
-- * The worker sends with libcurl, as pg_net does, but with the libcurl that ships in the
--   worker's Python package (curl 8): error texts are that version's curl_easy_strerror() (e.g.
--   "Could not connect to server" where curl 7 says "Couldn't").

create schema if not exists net;

create domain net.http_method as text
check (
  value ilike 'get'
  or value ilike 'post'
  or value ilike 'delete'
);

-- Pending requests; the worker deletes them as it sends them. API: private.
create unlogged table net.http_request_queue(
    id bigserial,
    method net.http_method not null,
    url text not null,
    headers jsonb,
    body bytea,
    timeout_milliseconds int not null
);

-- One row per finished request, kept for pg_net.ttl. API: private.
create unlogged table net._http_response(
    id bigint,
    status_code integer,
    content_type text,
    headers jsonb,
    content text,
    timed_out bool,
    error_msg text,
    created timestamptz not null default now()
);

create index on net._http_response (created);

create type net.request_status as enum ('PENDING', 'SUCCESS', 'ERROR');

create type net.http_response as (
    status_code integer,
    headers jsonb,
    body text
);

create type net.http_response_result as (
    status net.request_status,
    message text,
    response net.http_response
);

-- The worker is a client connection of the local runtime named 'pg_net <version>'; pg_net's own
-- is a background worker whose backend_type contains 'pg_net'. Either counts. Only a worker
-- connected to this database can serve its queue, so the check is per database.
create or replace function net.check_worker_is_up() returns void as $$
begin
  if not exists (
    select pid
    from pg_catalog.pg_stat_activity
    where (backend_type ilike '%pg_net%' or application_name ilike 'pg\_net %')
      and datname = pg_catalog.current_database()
      and pid <> pg_catalog.pg_backend_pid()
  ) then
    raise exception using
      message = 'the pg_net background worker is not up'
    , detail  = 'the pg_net background worker is down due to an internal error and cannot process requests'
    , hint    = 'make sure that you didn''t modify any of pg_net internal tables';
  end if;
end
$$ language plpgsql;
comment on function net.check_worker_is_up() is 'raises an exception if the pg_net background worker is not up, otherwise it doesn''t return anything';

-- Blocks until the response of request_id exists (polls every 50 ms, no timeout). API: private.
create or replace function net._await_response(
    request_id bigint
)
    returns bool
    language plpgsql
as $$
declare
    rec net._http_response;
begin
    while rec is null loop
        select *
        into rec
        from net._http_response
        where id = request_id;

        if rec is null then
            -- Wait 50 ms before checking again
            perform pg_sleep(0.05);
        end if;
    end loop;

    return true;
end;
$$;

-- Percent-encodes every byte of the UTF-8 text except A-Z a-z 0-9 - . _ ~ (curl_escape).
-- NULL in, NULL out. API: private.
create or replace function net._urlencode_string(string varchar)
    returns text
    language plpgsql
    immutable
as $$
declare
    bytes bytea := pg_catalog.convert_to(string, 'UTF8');
    encoded text := '';
    b int;
begin
    if string is null then
        return null;
    end if;
    for i in 0 .. pg_catalog.length(bytes) - 1 loop
        b := pg_catalog.get_byte(bytes, i);
        if b between 48 and 57 or b between 65 and 90 or b between 97 and 122
           or b in (45, 46, 95, 126) then
            encoded := encoded || pg_catalog.chr(b);
        else
            encoded := encoded || '%' || pg_catalog.upper(pg_catalog.lpad(pg_catalog.to_hex(b), 2, '0'));
        end if;
    end loop;
    return encoded;
end;
$$;

-- Parses url the way curl's URL API does (curl_url_set without scheme guessing), appends each
-- already-encoded 'key=value' of params_array to the query (keeping an existing query and the
-- fragment) and returns the normalised URL: lower-case scheme, '/' for an empty path, dot
-- segments removed, an empty port, query or fragment dropped. Errors carry curl's messages.
-- NULL in, NULL out. API: private.
create or replace function net._encode_url_with_params_array(url text, params_array text[])
    returns text
    language plpgsql
    immutable
as $$
declare
    parts text[];
    scheme text;
    after_scheme text;
    slashes int;
    rest text;
    authority text;
    remainder text;
    userinfo text;
    hostport text;
    host text;
    port text;
    path text;
    query text;
    fragment text;
    cut int;
    segments text[];
    kept text[];
    n int;
    param text;
begin
    if url is null or params_array is null then
        return null;
    end if;

    -- A scheme is a letter then up to 39 of [A-Za-z0-9+.-], then ':'.
    parts := pg_catalog.regexp_match(url, '^([A-Za-z][A-Za-z0-9+.-]{0,39}):(.*)$');
    if parts is null then
        raise exception 'invalid URL "%": Bad scheme', url using errcode = 'XX000';
    end if;
    scheme := pg_catalog.lower(parts[1]);
    after_scheme := parts[2];
    -- The schemes Debian's libcurl knows; the worker itself only speaks http and https.
    if scheme not in ('dict', 'file', 'ftp', 'ftps', 'gopher', 'gophers', 'http', 'https',
                      'imap', 'imaps', 'ldap', 'ldaps', 'mqtt', 'pop3', 'pop3s', 'rtmp',
                      'rtmpe', 'rtmps', 'rtmpt', 'rtmpte', 'rtmpts', 'rtsp', 'scp', 'sftp',
                      'smb', 'smbs', 'smtp', 'smtps', 'telnet', 'tftp') then
        raise exception 'invalid URL "%": Unsupported URL scheme', url using errcode = 'XX000';
    end if;
    if scheme = 'file' then
        -- curl keeps file URLs apart and drops the query; the worker refuses them anyway.
        return scheme || ':' || after_scheme;
    end if;

    slashes := pg_catalog.length(pg_catalog.substring(after_scheme, '^/{0,4}'));
    if slashes < 1 or slashes > 3 then
        raise exception 'invalid URL "%": Unsupported number of slashes following scheme', url
            using errcode = 'XX000';
    end if;
    rest := pg_catalog.substr(after_scheme, slashes + 1);
    authority := pg_catalog.substring(rest, '^[^/?#]*');
    remainder := pg_catalog.substr(rest, pg_catalog.length(authority) + 1);

    -- curl checks the parts from the end: fragment, query, path, then the authority.
    cut := pg_catalog.strpos(remainder, '#');
    if cut > 0 then
        fragment := pg_catalog.substr(remainder, cut + 1);
        remainder := pg_catalog.left(remainder, cut - 1);
        if fragment ~ '[[:cntrl:] ]' then
            raise exception 'invalid URL "%": Bad fragment', url using errcode = 'XX000';
        end if;
    end if;
    cut := pg_catalog.strpos(remainder, '?');
    if cut > 0 then
        query := pg_catalog.substr(remainder, cut + 1);
        remainder := pg_catalog.left(remainder, cut - 1);
        if query ~ '[[:cntrl:] ]' then
            raise exception 'invalid URL "%": Bad query', url using errcode = 'XX000';
        end if;
    end if;
    path := remainder;
    if path ~ '[[:cntrl:] ]' then
        raise exception 'invalid URL "%": Bad path', url using errcode = 'XX000';
    end if;

    cut := pg_catalog.strpos(authority, '@');
    if cut > 0 then
        userinfo := pg_catalog.left(authority, cut);
        hostport := pg_catalog.substr(authority, cut + 1);
    else
        userinfo := '';
        hostport := authority;
    end if;

    if hostport like '[%' then
        parts := pg_catalog.regexp_match(hostport, '^(\[[0-9A-Fa-f:.]*[0-9A-Fa-f:](%25[A-Za-z0-9._~-]+)?\])(.*)$');
        if parts is null or parts[1] !~ ':' then
            raise exception 'invalid URL "%": Bad IPv6 address', url using errcode = 'XX000';
        end if;
        host := parts[1];
        if parts[3] = '' then
            port := '';
        elsif parts[3] like ':%' then
            port := pg_catalog.substr(parts[3], 2);
        else
            raise exception 'invalid URL "%": Port number was not a decimal number between 0 and 65535', url
                using errcode = 'XX000';
        end if;
    else
        cut := pg_catalog.strpos(hostport, ':');
        if cut > 0 then
            host := pg_catalog.left(hostport, cut - 1);
            port := pg_catalog.substr(hostport, cut + 1);
        else
            host := hostport;
            port := '';
        end if;
    end if;
    if port <> '' then
        if port !~ '^[0-9]+$' or port::numeric > 65535 then
            raise exception 'invalid URL "%": Port number was not a decimal number between 0 and 65535', url
                using errcode = 'XX000';
        end if;
        port := ':' || (port::numeric)::int::text;
    end if;
    if host = '' then
        raise exception 'invalid URL "%": No host part in the URL', url using errcode = 'XX000';
    end if;
    if host !~ '^\[' and host ~ '[[:cntrl:] /:#?!@{}\[\]\\$''"^`*<>=;,+&()]' then
        raise exception 'invalid URL "%": Bad hostname', url using errcode = 'XX000';
    end if;

    if path = '' then
        path := '/';
    elsif path ~ '(^|/)\.\.?(/|$)' then
        -- Remove dot segments (RFC 3986 5.2.4) as curl does.
        segments := pg_catalog.string_to_array(pg_catalog.substr(path, 2), '/');
        kept := '{}';
        n := pg_catalog.cardinality(segments);
        for i in 1 .. n loop
            if segments[i] = '..' then
                kept := kept[1:pg_catalog.cardinality(kept) - 1];
            elsif segments[i] <> '.' then
                kept := kept || segments[i];
            end if;
            if i = n and segments[i] in ('.', '..') then
                kept := kept || ''::text;
            end if;
        end loop;
        path := '/' || pg_catalog.array_to_string(kept, '/');
    end if;

    foreach param in array params_array loop
        continue when param is null or param = '';
        if coalesce(query, '') = '' then
            query := param;
        else
            query := query || '&' || param;
        end if;
    end loop;

    return scheme || '://' || userinfo || host || port || path
        || case when coalesce(query, '') <> '' then '?' || query else '' end
        || case when coalesce(fragment, '') <> '' then '#' || fragment else '' end;
end;
$$;

-- Reloads the server configuration and asks the local worker to reconnect to this database, so
-- new pg_net.* settings (also ALTER DATABASE ... SET) take effect; the request is delivered at
-- commit. pg_net's C function reloads without checking the caller's privileges, so this one is
-- SECURITY DEFINER (owned by supabase_admin) for the same effect.
create or replace function net.worker_restart()
  returns bool
  language plpgsql
  security definer
  set search_path = ''
as $$
declare
  reloaded bool := pg_catalog.pg_reload_conf();
begin
  perform pg_catalog.pg_notify('pg_net_worker_restart', '');
  return reloaded;
end;
$$;

-- Waits until the worker is connected to this database (no timeout, like pg_net's).
create or replace function net.wait_until_running()
  returns void
  language plpgsql
as $$
begin
  loop
    -- pg_stat_activity is read once per transaction unless the snapshot is cleared.
    perform pg_catalog.pg_stat_clear_snapshot();
    exit when exists (
      select pid
      from pg_catalog.pg_stat_activity
      where (backend_type ilike '%pg_net%' or application_name ilike 'pg\_net %')
        and datname = pg_catalog.current_database()
        and pid <> pg_catalog.pg_backend_pid()
    );
    perform pg_catalog.pg_sleep(0.05);
  end loop;
end;
$$;
comment on function net.wait_until_running() is 'waits until the worker is running';

-- Wakes the worker once the current transaction commits (NOTIFY is delivered only on commit and
-- collapses duplicates within a transaction); nothing happens on rollback.
create or replace function net.wake()
  returns void
  language sql
as $$
  select pg_catalog.pg_notify('pg_net_wake', '');
$$;

-- Interface to make an async request
-- API: Public
create or replace function net.http_get(
    -- url for the request
    url text,
    -- key/value pairs to be url encoded and appended to the `url`
    params jsonb default '{}'::jsonb,
    -- key/values to be included in request headers
    headers jsonb default '{}'::jsonb,
    -- the maximum number of milliseconds the request may take before being cancelled
    timeout_milliseconds int default 5000
)
    -- request_id reference
    returns bigint
    language plpgsql
as $$
declare
    request_id bigint;
    params_array text[];
begin
    select coalesce(array_agg(net._urlencode_string(key) || '=' || net._urlencode_string(value)), '{}')
    into params_array
    from jsonb_each_text(params);

    -- Add to the request queue
    insert into net.http_request_queue(method, url, headers, timeout_milliseconds)
    values (
        'GET',
        net._encode_url_with_params_array(url, params_array),
        headers,
        timeout_milliseconds
    )
    returning id
    into request_id;

    perform net.wake();

    return request_id;
end
$$;

-- Interface to make an async request
-- API: Public
create or replace function net.http_post(
    -- url for the request
    url text,
    -- body of the POST request
    body jsonb default '{}'::jsonb,
    -- key/value pairs to be url encoded and appended to the `url`
    params jsonb default '{}'::jsonb,
    -- key/values to be included in request headers
    headers jsonb default '{"Content-Type": "application/json"}'::jsonb,
    -- the maximum number of milliseconds the request may take before being cancelled
    timeout_milliseconds int DEFAULT 5000
)
    -- request_id reference
    returns bigint
    language plpgsql
as $$
declare
    request_id bigint;
    params_array text[];
    content_type text;
begin

    -- Exctract the content_type from headers
    select
        header_value into content_type
    from
        jsonb_each_text(coalesce(headers, '{}'::jsonb)) r(header_name, header_value)
    where
        lower(header_name) = 'content-type'
    limit
        1;

    -- If the user provided new headers and omitted the content type
    -- add it back in automatically
    if content_type is null then
        select headers || '{"Content-Type": "application/json"}'::jsonb into headers;
    end if;

    -- Confirm that the content-type is set as "application/json"
    if content_type <> 'application/json' then
        raise exception 'Content-Type header must be "application/json"';
    end if;

    select
        coalesce(array_agg(net._urlencode_string(key) || '=' || net._urlencode_string(value)), '{}')
    into
        params_array
    from
        jsonb_each_text(params);

    -- Add to the request queue
    insert into net.http_request_queue(method, url, headers, body, timeout_milliseconds)
    values (
        'POST',
        net._encode_url_with_params_array(url, params_array),
        headers,
        convert_to(body::text, 'UTF8'),
        timeout_milliseconds
    )
    returning id
    into request_id;

    perform net.wake();

    return request_id;
end
$$;

-- Interface to make an async request
-- API: Public
create or replace function net.http_delete(
    -- url for the request
    url text,
    -- key/value pairs to be url encoded and appended to the `url`
    params jsonb default '{}'::jsonb,
    -- key/values to be included in request headers
    headers jsonb default '{}'::jsonb,
    -- the maximum number of milliseconds the request may take before being cancelled
    timeout_milliseconds int default 5000,
    -- optional body of the request
    body jsonb default NULL
)
    -- request_id reference
    returns bigint
    language plpgsql
as $$
declare
    request_id bigint;
    params_array text[];
begin
    select coalesce(array_agg(net._urlencode_string(key) || '=' || net._urlencode_string(value)), '{}')
    into params_array
    from jsonb_each_text(params);

    -- Add to the request queue
    insert into net.http_request_queue(method, url, headers, body, timeout_milliseconds)
    values (
        'DELETE',
        net._encode_url_with_params_array(url, params_array),
        headers,
        convert_to(body::text, 'UTF8'),
        timeout_milliseconds
    )
    returning id
    into request_id;

    perform net.wake();

    return request_id;
end
$$;

-- Collect respones of an http request
-- API: Private
create or replace function net._http_collect_response(
    -- request_id reference
    request_id bigint,
    -- when `true`, return immediately. when `false` wait for the request to complete before returning
    async bool default true
)
    -- http response composite wrapped in a result type
    returns net.http_response_result
    language plpgsql
as $$
declare
    rec net._http_response;
    req_exists boolean;
begin

    if not async then
        perform net._await_response(request_id);
    end if;

    select *
    into rec
    from net._http_response
    where id = request_id;

    if rec is null or rec.error_msg is not null then
        -- The request is either still processing or the request_id provided does not exist

        -- TODO: request in progress is indistinguishable from request that doesn't exist

        -- No request matching request_id found
        return (
            'ERROR',
            coalesce(rec.error_msg, 'request matching request_id not found'),
            null
        )::net.http_response_result;

    end if;

    -- Return a valid, populated http_response_result
    return (
        'SUCCESS',
        'ok',
        (
            rec.status_code,
            rec.headers,
            rec.content
        )::net.http_response
    )::net.http_response_result;
end;
$$;

-- Deprecated. Kept byte for byte: its bare SELECT makes PL/pgSQL raise "query has no destination
-- for result data", exactly as pg_net's does. Use net._http_collect_response.
create or replace function net.http_collect_response(
    -- request_id reference
    request_id bigint,
    -- when `true`, return immediately. when `false` wait for the request to complete before returning
    async bool default true
)
    -- http response composite wrapped in a result type
    returns net.http_response_result
    language plpgsql
as $$
begin
  raise notice 'The net.http_collect_response function is deprecated.';
  select net._http_collect_response(request_id, async);
end;
$$;

grant usage on schema net to PUBLIC;
grant all on all sequences in schema net to PUBLIC;
grant all on all tables in schema net to PUBLIC;
