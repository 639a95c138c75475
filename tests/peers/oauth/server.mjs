#!/usr/bin/env node
// Test peer: a real OAuth 2.1 authorization server (oidc-provider 9.x) on loopback.
//
//   node tests/peers/oauth/server.mjs [--config '<json>'] [--exit-on-stdin-eof]
//   (or env OAUTH_PEER_CONFIG='<json>'; --config keys win)
//
// Started and stopped by tests/peers/oauth/__init__.py (run_authorization_server); that module's
// docstring is the reference for the configuration keys and the test-only routes below.
//
// Once listening it prints one line `READY <port> <issuer>` to stdout. Everything else it prints
// to stdout is one JSON object per line (provider events: grant.error, server_error, ...).
// With --exit-on-stdin-eof it exits when its stdin closes (so that it never outlives the test
// process that started it, even one killed by SIGKILL).
//
// Test-only routes (always at the root of the origin, whatever the issuer path):
//   GET  /_stats          counters: token_requests by grant_type, refresh_reuse_detected, ...
//   POST /_stats/reset    zero the counters and logs
//   GET  /_events         the JSON event lines printed so far (last 500)
//   POST /_settings       JSON merged into the mutable settings (access_token_ttl, faults, ...)
//   POST /_clients        JSON client metadata, stored as if registered (upsert by client_id)
//   POST /_revoke?sub=S[&client_id=C]   revoke every grant of that account (and its tokens)

import * as crypto from 'node:crypto';
import * as http from 'node:http';

import Provider, { errors } from 'oidc-provider';

// --------------------------------------------------------------------------- configuration

const DEFAULTS = {
  host: '127.0.0.1',
  port: 0,
  issuer_path: '', // e.g. "/tenant": issuer http://127.0.0.1:<port>/tenant
  access_token_ttl: 3600,
  refresh_token_ttl: 14 * 24 * 3600,
  resource_scopes: ['mcp:tools', 'admin'], // scopes any accepted resource server may be granted
  default_scope: 'mcp:tools', // put on an authorization request that has no scope ('' = never)
  default_resource: null, // resource used when an authorization request names none
  require_resource: false, // token requests (code, refresh) without `resource` get invalid_target
  allowed_resource_hosts: ['127.0.0.1', 'localhost', '[::1]'],
  redirect_uris: ['http://127.0.0.1/callback'], // of the two built-in static clients
  clients: null, // replaces the built-in static clients (array of client metadata)
  discovery: ['oauth', 'openid', 'openid-appended'],
  cimd: false, // Client ID Metadata Document: false | true | {allow_http_loopback: bool}
  refresh_tokens: 'always', // 'always' | 'offline_access' | 'never', see issueRefreshToken
  rotate_refresh_tokens: true, // false: a refresh keeps the refresh token (and reuse is no theft)
  faults: [], // see applyFault
  log_success: false, // also print *.success events
  account_claims: {}, // sub -> more claims of that account, e.g. {"carol": {"groups": ["admins"]}}
};

function parseConfig() {
  let cfg = {};
  if (process.env.OAUTH_PEER_CONFIG) cfg = { ...cfg, ...JSON.parse(process.env.OAUTH_PEER_CONFIG) };
  const i = process.argv.indexOf('--config');
  if (i !== -1) cfg = { ...cfg, ...JSON.parse(process.argv[i + 1]) };
  const unknown = Object.keys(cfg).filter((k) => !(k in DEFAULTS));
  if (unknown.length) throw new TypeError(`unknown config keys: ${unknown.join(', ')}`);
  const out = { ...DEFAULTS, ...cfg };
  out.issuer_path = (out.issuer_path || '').replace(/\/+$/, '');
  if (out.issuer_path && !out.issuer_path.startsWith('/')) out.issuer_path = `/${out.issuer_path}`;
  if (!['always', 'offline_access', 'never'].includes(out.refresh_tokens)) {
    throw new TypeError(`refresh_tokens must be always, offline_access or never (got ${out.refresh_tokens})`);
  }
  return out;
}

const settings = parseConfig();
const MUTABLE = new Set([
  'access_token_ttl', 'refresh_token_ttl', 'default_scope', 'faults', 'log_success', 'resource_scopes',
  'require_resource',
]);

// --------------------------------------------------------------------------- stats and events

function emptyStats() {
  return {
    token_requests: {}, // grant_type -> count (every POST to the token endpoint)
    token_errors: {}, // "<grant_type>:<error>" -> count
    refresh_reuse_detected: 0, // refresh token replays (the grant is revoked each time)
    code_reuse_detected: 0, // authorization code replays (the grant is revoked too)
    grants_revoked: 0,
    authorization_requests: 0,
    authorizations_issued: 0, // redirects back with a code
    registrations: 0,
    revocation_requests: 0,
    introspection_requests: 0,
    discovery_requests: {}, // path -> count
    jwks_requests: 0,
    cimd_fetches: 0,
    faults_applied: 0,
    token_log: [], // one entry per token request, see recordToken
    authorization_log: [], // query parameters of each authorization request
  };
}

let stats = emptyStats();
let events = [];

function emit(event, fields = {}) {
  const line = { ts: Date.now() / 1000, event, ...fields };
  events.push(line);
  if (events.length > 500) events = events.slice(-500);
  process.stdout.write(`${JSON.stringify(line)}\n`);
}

function errFields(err) {
  if (!err) return {};
  return {
    error: err.error ?? err.name,
    error_description: err.error_description ?? err.message,
    error_detail: err.error_detail,
    status: err.status ?? err.statusCode,
  };
}

function ctxFields(ctx) {
  const oidc = ctx?.oidc;
  return {
    route: oidc?.route,
    client_id: oidc?.client?.clientId ?? oidc?.params?.client_id,
    grant_type: oidc?.params?.grant_type,
  };
}

function bump(obj, key) {
  obj[key] = (obj[key] ?? 0) + 1;
}

// --------------------------------------------------------------------------- keys and clients

function signingKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: crypto.randomBytes(8).toString('hex'), alg: 'RS256', use: 'sig' };
}

const STATIC_CONFIDENTIAL = { client_id: 'static-confidential', client_secret: 'static-confidential-secret' };
const STATIC_PUBLIC = { client_id: 'static-public' };

function defaultClients(redirectUris) {
  const common = {
    redirect_uris: redirectUris,
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
  };
  return [
    { ...common, ...STATIC_CONFIDENTIAL, token_endpoint_auth_method: 'client_secret_basic' },
    { ...common, ...STATIC_PUBLIC, token_endpoint_auth_method: 'none' },
  ];
}

function resourceAllowed(resource) {
  const url = URL.parse(resource);
  if (!url || !['http:', 'https:'].includes(url.protocol) || url.hash || url.username) return false;
  return settings.allowed_resource_hosts.includes(url.hostname);
}

// --------------------------------------------------------------------------- CIMD fetch (tests only)

function isLoopbackUrl(url) {
  return ['127.0.0.1', 'localhost', '[::1]'].includes(url.hostname);
}

// oidc-provider only accepts https:// client ids and refuses to fetch special-use (loopback)
// addresses. With cimd.allow_http_loopback the peer fetches https://<loopback>/... client ids
// over plain http instead, without that protection (loopback tests have no TLS), and also
// accepts http://<loopback>/... client ids (see allowHttpLoopbackClientIds).
function cimdHttpLoopback() {
  return typeof settings.cimd === 'object' && settings.cimd !== null && settings.cimd.allow_http_loopback;
}

const HTTP_LOOPBACK_ID = /^http:\/\/(?:127\.0\.0\.1|localhost|\[::1\])(?::\d+)?\/[^#]*$/;

// A client id http://<loopback>/... is resolved as a metadata document too. oidc-provider checks
// for https inside Client.find, so this wraps it and calls the library's own resolver (internal
// module, imported by file path: the same module instance the library uses).
async function allowHttpLoopbackClientIds(provider) {
  const internal = new URL('./node_modules/oidc-provider/lib/helpers/client_id_metadata_document.js', import.meta.url);
  const { resolveClientByMetadataDocument } = await import(internal);
  const find = provider.Client.find.bind(provider.Client);
  provider.Client.find = async (id) => {
    const found = await find(id);
    if (found || typeof id !== 'string' || !HTTP_LOOPBACK_ID.test(id)) return found;
    return resolveClientByMetadataDocument(provider, id);
  };
}

async function cimdFetch(url, options) {
  const target = new URL(url);
  if (cimdHttpLoopback() && isLoopbackUrl(target)) {
    stats.cimd_fetches += 1;
    target.protocol = 'http:';
    const { dispatcher, ...rest } = options;
    emit('cimd.fetch', { url: String(url), fetched: String(target) });
    return globalThis.fetch(target, rest);
  }
  stats.cimd_fetches += 1;
  return globalThis.fetch(url, options);
}

// --------------------------------------------------------------------------- provider

async function buildProvider(issuer) {
  const configuration = {
    clients: settings.clients ?? defaultClients(settings.redirect_uris),
    jwks: { keys: [signingKey()] },
    cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
    async findAccount(ctx, sub) {
      const more = settings.account_claims[sub] ?? {};
      return { accountId: sub, async claims() { return { email: `${sub}@example.com`, ...more, sub }; } };
    },
    scopes: ['openid', 'offline_access'],
    // An OpenID Connect provider for sign-in tests: scope claims go into the ID token itself.
    claims: {
      openid: ['sub'], profile: ['name', 'preferred_username'], email: ['email'], groups: ['groups'],
    },
    conformIdTokenClaims: false,
    responseTypes: ['code'],
    pkce: { required: () => true },
    clientBasedCORS: () => true,
    features: {
      devInteractions: { enabled: true },
      registration: { enabled: true },
      revocation: { enabled: true },
      introspection: { enabled: true },
      // For clients registered with the client_credentials grant (machine to machine).
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        async defaultResource(ctx, client, oneOf) {
          return oneOf ?? settings.default_resource ?? undefined;
        },
        async getResourceServerInfo(ctx, resource) {
          if (!resourceAllowed(resource)) throw new errors.InvalidTarget();
          return {
            scope: settings.resource_scopes.join(' '),
            audience: resource,
            accessTokenTTL: settings.access_token_ttl,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
      clientIdMetadataDocument: settings.cimd
        ? { enabled: true, ack: 'draft-02', cacheDuration: { min: 0, max: 60 } }
        : { enabled: false },
    },
    fetch: cimdFetch,
    // Refresh tokens only for clients registered with the refresh_token grant, and then:
    // 'always' whatever the scope; 'offline_access' only when that scope was granted too
    // (oidc-provider's own default, and Okta's, Auth0's, Entra ID's); 'never' not at all.
    async issueRefreshToken(ctx, client, code) {
      if (settings.refresh_tokens === 'never') return false;
      const allowed = client.grantTypeAllowed('refresh_token');
      if (settings.refresh_tokens === 'offline_access') return allowed && code.scopes.has('offline_access');
      return allowed;
    },
    rotateRefreshToken: () => settings.rotate_refresh_tokens,
    async expiresWithSession() {
      return false;
    },
    ttl: {
      AccessToken: (ctx, token) => token.resourceServer?.accessTokenTTL ?? settings.access_token_ttl,
      RefreshToken: () => settings.refresh_token_ttl,
      ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL ?? settings.access_token_ttl,
      AuthorizationCode: () => 60,
      Grant: () => settings.refresh_token_ttl,
      IdToken: () => 3600,
      Interaction: () => 600,
      Session: () => 24 * 3600,
    },
  };
  const provider = new Provider(issuer, configuration);
  provider.proxy = false;
  if (cimdHttpLoopback()) await allowHttpLoopbackClientIds(provider);

  // Events, printed as JSON lines.
  const errorEvents = [
    'authorization.error', 'backchannel.error', 'jwks.error', 'check_session_origin.error',
    'check_session.error', 'discovery.error', 'end_session.error', 'grant.error',
    'introspection.error', 'pushed_authorization_request.error', 'registration_create.error',
    'registration_delete.error', 'registration_read.error', 'registration_update.error',
    'revocation.error', 'userinfo.error',
  ];
  for (const name of errorEvents) {
    provider.on(name, (ctx, err) => {
      if (name === 'grant.error' && err?.error_detail === 'refresh token already used') {
        stats.refresh_reuse_detected += 1;
        emit('refresh_reuse_detected', { ...ctxFields(ctx) });
      }
      if (name === 'grant.error' && err?.error_detail === 'authorization code already consumed') {
        stats.code_reuse_detected += 1;
        emit('code_reuse_detected', { ...ctxFields(ctx) });
      }
      emit(name, { ...ctxFields(ctx), ...errFields(err) });
    });
  }
  provider.on('server_error', (ctx, err) => {
    emit('server_error', { ...ctxFields(ctx), ...errFields(err), stack: err?.stack });
  });
  provider.on('grant.revoked', (ctx, grantId) => {
    stats.grants_revoked += 1;
    emit('grant.revoked', { ...ctxFields(ctx), grant_id: grantId });
  });
  provider.on('grant.success', (ctx) => {
    if (settings.log_success) emit('grant.success', ctxFields(ctx));
  });
  provider.on('authorization.success', (ctx) => {
    stats.authorizations_issued += 1;
    if (settings.log_success) emit('authorization.success', ctxFields(ctx));
  });
  provider.on('registration_create.success', (ctx, client) => {
    stats.registrations += 1;
    emit('registration_create.success', {
      client_id: client.clientId,
      grant_types: client.grantTypes,
      token_endpoint_auth_method: client.clientAuthMethod,
      redirect_uris: client.redirectUris,
    });
  });
  // Grants by account, for POST /_revoke.
  provider.on('grant.saved', (grant) => {
    grants.set(grant.jti, { accountId: grant.accountId, clientId: grant.clientId });
  });
  provider.on('grant.destroyed', (grant) => {
    grants.delete(grant.jti);
  });

  // Pre/post middleware around every provider route.
  provider.use(async (ctx, next) => {
    const path = ctx.path;
    if (path === '/auth' && ctx.method === 'GET') {
      stats.authorization_requests += 1;
      stats.authorization_log.push({ ...ctx.query });
      if (settings.default_scope && !ctx.query.scope && !ctx.query.request && !ctx.query.request_uri) {
        ctx.query = { ...ctx.query, scope: settings.default_scope };
        // oidc-provider finds its mount path by comparing req.originalUrl with the request URL.
        ctx.req.originalUrl = settings.issuer_path + ctx.request.url;
      }
    } else if (path === '/token/revocation') {
      stats.revocation_requests += 1;
    } else if (path === '/token/introspection') {
      stats.introspection_requests += 1;
    } else if (path === '/jwks') {
      stats.jwks_requests += 1;
    }
    await next();
    if (ctx.oidc?.route === 'discovery' && ctx.body && typeof ctx.body === 'object') {
      // The resource servers' scopes too, so that a client can fall back to them.
      ctx.body.scopes_supported = [...new Set([...ctx.body.scopes_supported, ...settings.resource_scopes])];
    }
    if (path === '/token' && ctx.req.keybearer) {
      const entry = ctx.req.keybearer;
      entry.status = ctx.status;
      entry.client_id = ctx.oidc?.client?.clientId ?? entry.client_id;
      if (ctx.status >= 400 && ctx.body && typeof ctx.body === 'object') {
        entry.error = ctx.body.error;
        entry.error_description = ctx.body.error_description;
        bump(stats.token_errors, `${entry.grant_type}:${entry.error}`);
      }
    }
  });
  return provider;
}

const grants = new Map(); // grant id -> {accountId, clientId}

// --------------------------------------------------------------------------- helpers (plain node http)

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function sendJson(res, status, payload) {
  const body = JSON.stringify(payload);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
  res.end(body);
}

const sleep = (s) => new Promise((r) => { setTimeout(r, s * 1000); });

// A fault: {route: "token" | "discovery", grant_type?: "...", status?: 503, delay?: seconds, count?: n (default 1,
// -1 forever), body?: {...}}. `delay` without `status` delays the real answer; with `status`, the
// fault answers that status (after the delay) and the provider never sees the request.
async function applyFault(route, params, res) {
  const fault = settings.faults.find(
    (f) => f.route === route && (!f.grant_type || f.grant_type === params.grant_type) && (f.count ?? 1) !== 0,
  );
  if (!fault) return false;
  if (fault.count === undefined) fault.count = 1;
  if (fault.count > 0) fault.count -= 1;
  stats.faults_applied += 1;
  emit('fault', { route, grant_type: params.grant_type, status: fault.status, delay: fault.delay });
  if (fault.delay) await sleep(fault.delay);
  if (!fault.status) return false;
  sendJson(res, fault.status, fault.body ?? { error: 'server_error', error_description: 'injected fault' });
  return true;
}

async function revokeGrants(provider, sub, clientId) {
  let n = 0;
  for (const [grantId, g] of [...grants]) {
    if (g.accountId !== sub || (clientId && g.clientId !== clientId)) continue;
    await Promise.all([
      provider.AccessToken.revokeByGrantId(grantId),
      provider.RefreshToken.revokeByGrantId(grantId),
      provider.AuthorizationCode.revokeByGrantId(grantId),
      provider.Grant.adapter.destroy(grantId),
    ]);
    grants.delete(grantId);
    stats.grants_revoked += 1;
    emit('grant.revoked', { route: '_revoke', client_id: g.clientId, sub, grant_id: grantId });
    n += 1;
  }
  return n;
}

async function testRoute(provider, req, res, url) {
  const path = url.pathname;
  if (path === '/_stats' && req.method === 'GET') return sendJson(res, 200, stats);
  if (path === '/_events' && req.method === 'GET') return sendJson(res, 200, events);
  if (path === '/_stats/reset' && req.method === 'POST') {
    stats = emptyStats();
    events = [];
    return sendJson(res, 200, stats);
  }
  if (path === '/_settings' && req.method === 'POST') {
    const body = JSON.parse((await readBody(req)).toString() || '{}');
    const bad = Object.keys(body).filter((k) => !MUTABLE.has(k));
    if (bad.length) return sendJson(res, 400, { error: `not mutable: ${bad.join(', ')}` });
    Object.assign(settings, body);
    return sendJson(res, 200, Object.fromEntries([...MUTABLE].map((k) => [k, settings[k]])));
  }
  if (path === '/_clients' && req.method === 'POST') {
    const metadata = JSON.parse((await readBody(req)).toString());
    await provider.Client.adapter.upsert(metadata.client_id, metadata);
    try {
      const client = await provider.Client.find(metadata.client_id);
      return sendJson(res, 200, client.metadata());
    } catch (err) {
      await provider.Client.adapter.destroy(metadata.client_id);
      return sendJson(res, 400, errFields(err));
    }
  }
  if (path === '/_revoke' && req.method === 'POST') {
    const sub = url.searchParams.get('sub');
    if (!sub) return sendJson(res, 400, { error: 'sub is required' });
    const n = await revokeGrants(provider, sub, url.searchParams.get('client_id'));
    return sendJson(res, 200, { revoked_grants: n });
  }
  return sendJson(res, 404, { error: 'not_found' });
}

// Which well-known URL serves the provider's metadata, for the issuer path P ('' or '/tenant'):
//   oauth            /.well-known/oauth-authorization-server{P}    (RFC 8414, path inserted)
//   openid           /.well-known/openid-configuration{P}          (path inserted)
//   openid-appended  {P}/.well-known/openid-configuration          (OpenID Connect Discovery 1.0)
// With P = '' the two openid forms are the same URL. Anything else under /.well-known is 404.
function discoveryTarget(path) {
  const p = settings.issuer_path;
  const d = new Set(settings.discovery);
  if (path === `/.well-known/oauth-authorization-server${p}`) {
    return d.has('oauth') ? `${p}/.well-known/oauth-authorization-server` : null;
  }
  if (path === `/.well-known/openid-configuration${p}`) {
    return d.has('openid') || (!p && d.has('openid-appended')) ? `${p}/.well-known/openid-configuration` : null;
  }
  if (p && path === `${p}/.well-known/openid-configuration`) {
    return d.has('openid-appended') ? path : null;
  }
  return null;
}

// How a token request authenticated its client, as sent (whether it was accepted is in `status`).
function clientAuth(req, params) {
  if ((req.headers.authorization ?? '').startsWith('Basic ')) return 'client_secret_basic';
  if (params.client_assertion) return 'private_key_jwt';
  if (params.client_secret) return 'client_secret_post';
  return 'none';
}

async function handle(provider, callback, req, res) {
  const url = new URL(req.url, 'http://x');
  const path = url.pathname;
  if (path.startsWith('/_')) return testRoute(provider, req, res, url);

  const p = settings.issuer_path;
  let inner = null; // the path inside the provider (mount path stripped)
  if (path.includes('/.well-known/')) {
    const target = discoveryTarget(path);
    if (!target) return sendJson(res, 404, { error: 'not_found' });
    bump(stats.discovery_requests, path);
    if (await applyFault('discovery', {}, res)) return undefined;
    inner = target.slice(p.length) + url.search;
  } else if (!p) {
    inner = req.url;
  } else if (path === p || path.startsWith(`${p}/`)) {
    inner = req.url.slice(p.length) || '/';
  } else {
    return sendJson(res, 404, { error: 'not_found' });
  }

  if (inner.split('?')[0] === '/token' && req.method === 'POST') {
    // Read the body here to count the request by grant type whatever the outcome, then hand it to
    // the provider as an already parsed body (oidc-provider's documented fallback).
    const body = await readBody(req);
    const params = Object.fromEntries(new URLSearchParams(body.toString()));
    const entry = {
      ts: Date.now() / 1000,
      grant_type: params.grant_type ?? 'missing',
      client_id: params.client_id ?? null, // null when the client authenticated with Basic
      client_auth: clientAuth(req, params),
      resource: params.resource ?? null,
      scope: params.scope ?? null,
      has_code_verifier: 'code_verifier' in params,
      redirect_uri: params.redirect_uri ?? null,
    };
    bump(stats.token_requests, entry.grant_type);
    stats.token_log.push(entry);
    if (await applyFault('token', params, res)) {
      entry.status = res.statusCode;
      entry.error = 'injected';
      return undefined;
    }
    if (settings.require_resource && !params.resource
        && ['authorization_code', 'refresh_token'].includes(params.grant_type)) {
      entry.status = 400;
      entry.error = 'invalid_target';
      bump(stats.token_errors, `${entry.grant_type}:invalid_target`);
      emit('grant.error', {
        route: 'token', grant_type: params.grant_type, client_id: params.client_id, error: 'invalid_target',
        error_detail: 'no resource parameter (require_resource is set)',
      });
      return sendJson(res, 400, { error: 'invalid_target', error_description: 'the resource parameter is required' });
    }
    req.body = body;
    req.keybearer = entry;
  }
  req.originalUrl = p + inner;
  req.url = inner;
  return callback(req, res);
}

async function main() {
  const server = http.createServer();
  await new Promise((resolve) => { server.listen(settings.port, settings.host, resolve); });
  const { port } = server.address();
  const issuer = `http://${settings.host}:${port}${settings.issuer_path}`;
  const provider = await buildProvider(issuer);
  const callback = provider.callback();
  server.on('request', (req, res) => {
    handle(provider, callback, req, res).catch((err) => {
      emit('peer_error', { error: String(err), stack: err?.stack });
      if (!res.headersSent) sendJson(res, 500, { error: 'server_error' });
    });
  });
  if (process.argv.includes('--exit-on-stdin-eof')) {
    process.stdin.on('end', () => process.exit(0));
    process.stdin.on('error', () => process.exit(0));
    process.stdin.resume();
  }
  process.on('SIGTERM', () => process.exit(0));
  process.stdout.write(`READY ${port} ${issuer}\n`);
}

main().catch((err) => {
  process.stderr.write(`${err.stack}\n`);
  process.exit(1);
});
