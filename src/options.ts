import { randomBytes } from 'node:crypto'
import { isIP } from 'node:net'
import type { CookieOptions as ExpressCookieOptions } from 'express-session'
import type { LockingMode } from './core/locking-policy.js'
import { type SerializerOption, SessionSerializer } from './core/serializer.js'
import { ConfigError } from './errors.js'
import { type Logger, silentLogger } from './logger.js'
import { NODE_ID_PATTERN } from './session-id.js'

/** express-session's cookie options, with the `sameSite: 'auto'` this library resolves per request, as `secure`. */
export type CookieOptions = Omit<ExpressCookieOptions, 'sameSite'> & {
  sameSite?: ExpressCookieOptions['sameSite'] | 'auto'
}

/**
 * A node in the array form of `nodes`: a memcached server `{ id, host, port }` (with `username` and `password`
 * for SASL authentication), a Redis server
 * `{ id, url: 'redis://…' }` (`rediss://` for TLS; credentials in the URL), a Redis Cluster counted as one
 * node `{ id, cluster: ['redis://…', …] }`, or a Sentinel-managed master `{ id, sentinels: ['redis://…', …], name }`
 * (`masterUrl` for the master's credentials, TLS and database). Any other key, unless undefined, is a ConfigError.
 */
export type NodeSpec =
  | {
      readonly id: string
      readonly host: string
      readonly port?: number
      readonly username?: string
      readonly password?: string
    }
  | { readonly id: string; readonly url: string }
  | { readonly id: string; readonly cluster: readonly string[] }
  | {
      readonly id: string
      readonly sentinels: readonly string[]
      readonly name: string
      readonly masterUrl?: string
    }

/** A validated node. */
export type NodeConfig =
  | {
      readonly kind: 'memcached'
      readonly id: string
      readonly host: string
      readonly port: number
      /** SASL PLAIN credentials, when the server requires them. */
      readonly credentials: { readonly username: string; readonly password: string } | undefined
    }
  | { readonly kind: 'redis'; readonly id: string; readonly url: string }
  | { readonly kind: 'redis-cluster'; readonly id: string; readonly cluster: readonly string[] }
  | {
      readonly kind: 'redis-sentinel'
      readonly id: string
      readonly sentinels: readonly string[]
      readonly name: string
      /** `rediss://user:password@any/db`: credentials, TLS and database of the master (its host is ignored). */
      readonly masterUrl: string | undefined
    }

/**
 * `Request` is what a function `lockingMode` is given: IncomingMessage under Express, FastifyRequest under Fastify
 * (FastifySessionFailoverOptions). Left unknown, one options object serves both.
 */
export interface SessionFailoverOptions<Request = unknown> {
  /** Signs the session cookie. An array rotates secrets: the first signs, every one verifies. */
  secret: string | readonly string[]
  /** `'n1:10.0.0.1:11211 n2:10.0.0.2:11211'` (spaces or commas) or `[{ id, host, port }]`. */
  nodes?: string | readonly NodeSpec[]
  /** Sticky mode: sessions served from this instance's memory, backed up to two nodes. Default false. */
  sticky?: boolean
  /** Sticky mode: this instance's name, carried in session ids (`<random>-<node>.<route>`). Default: random. */
  route?: string
  /** Sticky mode: back up after the response, through a coalescing queue, instead of before it. Default false. */
  backupAsync?: boolean
  /** Node ids used only when no other node is alive (e.g. the memcached on this host). Default none. */
  failoverNodes?: string | readonly string[]
  /** Sticky mode: most sessions kept in memory. Default 10000. */
  localMaxSessions?: number
  /** Sticky mode: most bytes of session data kept in memory. Default 64 MiB. */
  localMaxBytes?: number
  /** Cookie name. Default `connect.sid`, as express-session. */
  name?: string
  /** Cookie options, as express-session's `cookie`. */
  cookie?: CookieOptions
  /** Send the cookie on every response, resetting its expiry. Default false. */
  rolling?: boolean
  /** Write the session even when unchanged. Default false. */
  resave?: boolean
  /** Store new sessions that were never modified. Default false. */
  saveUninitialized?: boolean
  /** Trust X-Forwarded-Proto for secure cookies; undefined follows Express's `trust proxy`. */
  proxy?: boolean
  /** What happens when `req.session` is deleted or set to null: 'keep' (default) or 'destroy'. */
  unset?: 'keep' | 'destroy'
  /** Prefix of every cache key. Default `sf:`. */
  prefix?: string
  /** Seconds a session lives in the cache when its cookie has no expiry. Default 86400 (one day). */
  ttl?: number
  /** Milliseconds any single cache operation may take before its node is marked dead. Default 1000. */
  operationTimeout?: number
  /** Milliseconds between attempts to reach a dead node again. Default 2000. */
  nodeProbeInterval?: number
  /** Fraction of the TTL after which an unchanged session's expiry is refreshed (a touch). Default 0.1. */
  touchAfter?: number
  /** Milliseconds between checks (per session, per instance) that a read session's backup still exists. Default 60000. */
  backupCheckInterval?: number
  /** Non-sticky: how parallel requests of one session are kept from losing updates. Default 'auto'. */
  lockingMode?: LockingMode<Request>
  /** Non-sticky: milliseconds a request waits for its session's lock. Default 3000. */
  lockTimeout?: number
  /**
   * Non-sticky: seconds a lock lives, so a holder that died blocks the session at most this long. Default
   * max(10, floor((operationTimeout + 100) / 1000) + 2), which is 10 unless operationTimeout is 8900 ms or more.
   */
  lockExpiration?: number
  /** Non-sticky: 'fail' (503) or 'proceed' (run, and merge the write) when the lock times out. Default 'fail'. */
  lockTimeoutAction?: 'fail' | 'proceed'
  /** A pino-compatible logger. Default: silent. */
  logger?: Logger
  /**
   * Keys of stored sessions (integrity tag, and encryption when `encrypt` is on), each at least 16 bytes. An
   * array rotates them: the first writes, every one reads. Default: derived from `secret`.
   */
  storeKeys?: string | Uint8Array | readonly (string | Uint8Array)[]
  /** Encrypt stored sessions with AES-256-GCM. Default false (they are signed, not hidden). */
  encrypt?: boolean
  /** How session data is stored: 'json' (default), 'v8', 'msgpack' (needs msgpackr), or { serialize, deserialize }. */
  serializer?: SerializerOption
  /** Largest stored session in bytes; a larger one is an error and is not written. Default 1047552 (1 MiB - 1 KiB). */
  maxSessionBytes?: number
  /** Seconds a session may live from its creation however active it is. Default: no limit (idle timeout only). */
  absoluteTimeout?: number
}

export interface Config {
  readonly secrets: readonly string[]
  /** undefined: no nodes configured, the in-process development store is used. */
  readonly nodes: readonly NodeConfig[] | undefined
  readonly failoverNodeIds: ReadonlySet<string>
  /** Set in sticky mode only. */
  readonly sticky:
    | {
        readonly route: string
        readonly backupAsync: boolean
        readonly localMaxSessions: number
        readonly localMaxBytes: number
      }
    | undefined
  readonly name: string
  readonly cookie: Readonly<CookieOptions>
  readonly rolling: boolean
  readonly resave: boolean
  readonly saveUninitialized: boolean
  readonly proxy: boolean | undefined
  readonly unsetDestroy: boolean
  readonly prefix: string
  readonly ttlSeconds: number
  readonly operationTimeoutMs: number
  readonly nodeProbeIntervalMs: number
  readonly touchAfter: number
  readonly backupCheckIntervalMs: number
  /** Set in non-sticky mode only. */
  readonly locking:
    | {
        readonly mode: LockingMode
        readonly lockTimeoutMs: number
        readonly lockExpirationSeconds: number
        readonly lockTimeoutAction: 'fail' | 'proceed'
      }
    | undefined
  readonly logger: Logger
  /** Secrets the store keys are derived from: `storeKeys`, or else `secret`. */
  readonly storeSecrets: readonly (string | Buffer)[]
  readonly encrypt: boolean
  readonly serializer: SessionSerializer
  readonly maxSessionBytes: number
  readonly absoluteTimeoutMs: number | undefined
}

/** memcached's default item limit is 1 MiB, key and item header included; the default keeps clear of it. */
const DEFAULT_MAX_SESSION_BYTES = 1024 * 1024 - 1024

/** Every option `sessionFailover()` accepts. */
export const OPTION_NAMES: ReadonlySet<string> = new Set([
  'secret',
  'nodes',
  'sticky',
  'route',
  'backupAsync',
  'failoverNodes',
  'localMaxSessions',
  'localMaxBytes',
  'name',
  'cookie',
  'rolling',
  'resave',
  'saveUninitialized',
  'proxy',
  'unset',
  'prefix',
  'ttl',
  'operationTimeout',
  'nodeProbeInterval',
  'touchAfter',
  'backupCheckInterval',
  'lockingMode',
  'lockTimeout',
  'lockExpiration',
  'lockTimeoutAction',
  'logger',
  'storeKeys',
  'encrypt',
  'serializer',
  'maxSessionBytes',
  'absoluteTimeout',
])

const USE_NAME = 'use `name` for the cookie name'
const GENERATED_IDS =
  'session ids carry the id of the node that holds them, so they are always generated by session-failover'

const REFUSED_OPTIONS: Readonly<Record<string, string>> = {
  store: 'session-failover is the store; configure `nodes` instead',
  genid: GENERATED_IDS,
  key: USE_NAME,
  // @fastify/session's names for the same two.
  cookieName: USE_NAME,
  idGenerator: GENERATED_IDS,
}

const KNOWN_COOKIE_OPTIONS = new Set([
  'maxAge',
  'expires',
  'secure',
  'httpOnly',
  'path',
  'domain',
  'sameSite',
  'partitioned',
  'priority',
])

/** Cookie options of express-session's type that this library does not honour: refused, not ignored. */
const REFUSED_COOKIE_OPTIONS: Readonly<Record<string, string>> = {
  signed: 'the session cookie is always signed with `secret`',
  encode: 'the session cookie is always URL-encoded, as express-session writes it',
}

/** The `cookie` package's own test of a Domain attribute, applied at start-up instead of on every response. */
const COOKIE_DOMAIN = /^([.]?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)([.][a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$/i
/** The cookie package's rule for a Path attribute: printable ASCII, no ';'. */
const COOKIE_PATH = /^[\u0020-\u003A\u003D-\u007E]*$/
const SAME_SITE = new Set<unknown>([true, false, 'lax', 'strict', 'none', 'auto'])
const PRIORITY = new Set<unknown>(['low', 'medium', 'high'])

/** Parses and validates user options into one frozen, fully-defaulted config. Throws ConfigError. */
export function parseOptions(options: unknown, env: string | undefined = process.env.NODE_ENV): Config {
  if (!isPlainObject(options)) {
    throw new ConfigError(`Expected options to be an object like { secret, nodes }, got ${describe(options)}`)
  }
  for (const key of Object.keys(options)) {
    const refusal = Object.hasOwn(REFUSED_OPTIONS, key) ? REFUSED_OPTIONS[key] : undefined
    if (refusal) throw new ConfigError(`Option \`${key}\` is not supported: ${refusal}`)
    if (!OPTION_NAMES.has(key)) throw new ConfigError(unknownOption(key))
  }
  const o = options as Record<string, unknown>

  const sticky = optionalBoolean(o, 'sticky', false)
  if (!sticky) {
    for (const key of ['route', 'backupAsync', 'localMaxSessions', 'localMaxBytes']) {
      if (o[key] !== undefined) throw new ConfigError(`Option \`${key}\` needs \`sticky: true\``)
    }
  } else {
    for (const key of ['lockingMode', 'lockTimeout', 'lockExpiration', 'lockTimeoutAction']) {
      if (o[key] !== undefined) {
        throw new ConfigError(`Option \`${key}\` applies to non-sticky mode; a sticky session has one owner`)
      }
    }
  }
  const lockTimeoutAction = o.lockTimeoutAction ?? 'fail'
  if (lockTimeoutAction !== 'fail' && lockTimeoutAction !== 'proceed') {
    throw new ConfigError(
      `Expected \`lockTimeoutAction\` to be 'fail' or 'proceed', got ${describe(lockTimeoutAction)}`,
    )
  }

  const nodes = o.nodes === undefined ? undefined : parseNodes(o.nodes)
  if (nodes === undefined && env === 'production') {
    throw new ConfigError(
      'No `nodes` configured and NODE_ENV is production: sessions would live in one process and be lost with it. ' +
        "Set `nodes`, e.g. 'n1:10.0.0.1:11211 n2:10.0.0.2:11211'",
    )
  }

  const unset = o.unset ?? 'keep'
  if (unset !== 'keep' && unset !== 'destroy') {
    throw new ConfigError(`Expected \`unset\` to be 'keep' or 'destroy', got ${describe(unset)}`)
  }

  const secrets = parseSecrets(o.secret)
  return Object.freeze({
    secrets,
    nodes,
    failoverNodeIds: parseFailoverNodes(o.failoverNodes, nodes),
    sticky: sticky
      ? Object.freeze({
          route: optionalString(o, 'route', randomRoute(), NODE_ID_PATTERN, "1-32 letters, digits or '_'"),
          backupAsync: optionalBoolean(o, 'backupAsync', false),
          localMaxSessions: optionalNumber(o, 'localMaxSessions', 10_000, {
            min: 1,
            integer: true,
            unit: 'sessions',
          }),
          localMaxBytes: optionalNumber(o, 'localMaxBytes', 64 * 1024 * 1024, {
            min: 1024,
            integer: true,
            unit: 'bytes',
          }),
        })
      : undefined,
    name: cookieName(o),
    cookie: parseCookie(o.cookie),
    rolling: optionalBoolean(o, 'rolling', false),
    resave: optionalBoolean(o, 'resave', false),
    saveUninitialized: optionalBoolean(o, 'saveUninitialized', false),
    proxy: o.proxy === undefined ? undefined : optionalBoolean(o, 'proxy', false),
    unsetDestroy: unset === 'destroy',
    prefix: optionalString(
      o,
      'prefix',
      'sf:',
      /^[\x21-\x7e]{0,100}$/,
      'up to 100 printable ASCII characters, no spaces',
    ),
    ttlSeconds: optionalNumber(o, 'ttl', 86_400, { min: 1, max: 31_536_000, integer: true, unit: 'seconds' }),
    // The timers' upper bounds: Node runs a longer delay after 1 ms (a warning, not an error), so a timeout meant as
    // "never" would fail every operation at once and mark every node dead.
    operationTimeoutMs: optionalNumber(o, 'operationTimeout', 1000, {
      min: 1,
      max: MAX_OPERATION_TIMEOUT_MS,
      unit: 'milliseconds',
    }),
    nodeProbeIntervalMs: optionalNumber(o, 'nodeProbeInterval', 2000, {
      min: 1,
      max: MAX_TIMER_MS,
      unit: 'milliseconds',
    }),
    touchAfter: optionalNumber(o, 'touchAfter', 0.1, { min: 0, max: 1, unit: 'fraction of the TTL' }),
    backupCheckIntervalMs: optionalNumber(o, 'backupCheckInterval', 60_000, { min: 1, unit: 'milliseconds' }),
    locking: sticky
      ? undefined
      : Object.freeze({
          mode: parseLockingMode(o.lockingMode),
          lockTimeoutMs: optionalNumber(o, 'lockTimeout', 3000, {
            min: 1,
            max: MAX_TIMER_MS,
            unit: 'milliseconds',
          }),
          lockExpirationSeconds: lockExpiration(o),
          lockTimeoutAction,
        }),
    logger: parseLogger(o.logger),
    storeSecrets: o.storeKeys === undefined ? secrets : parseStoreKeys(o.storeKeys),
    encrypt: optionalBoolean(o, 'encrypt', false),
    serializer: parseSerializer(o.serializer),
    maxSessionBytes: optionalNumber(o, 'maxSessionBytes', DEFAULT_MAX_SESSION_BYTES, {
      min: 1024,
      max: 512 * 1024 * 1024,
      integer: true,
      unit: 'bytes',
    }),
    absoluteTimeoutMs:
      o.absoluteTimeout === undefined
        ? undefined
        : 1000 *
          optionalNumber(o, 'absoluteTimeout', 0, {
            min: 1,
            max: 31_536_000,
            integer: true,
            unit: 'seconds',
          }),
  })
}

/** At least 16 bytes: a store key is the one secret between a cache dump and forged or readable sessions. */
const MIN_STORE_KEY_BYTES = 16

function parseStoreKeys(value: unknown): readonly Buffer[] {
  const keys = Array.isArray(value) ? value : [value]
  const expected = `Expected \`storeKeys\` to be a string or Uint8Array of at least ${MIN_STORE_KEY_BYTES} bytes, or a non-empty array of them`
  if (keys.length === 0) throw new ConfigError(`${expected}, got an empty array`)
  return Object.freeze(
    keys.map((key: unknown, index) => {
      const bytes =
        typeof key === 'string' ? Buffer.from(key) : key instanceof Uint8Array ? Buffer.from(key) : undefined
      if (!bytes || bytes.length < MIN_STORE_KEY_BYTES) {
        // Never echo a key.
        const given =
          bytes === undefined
            ? describe(key)
            : `${bytes.length} bytes${Array.isArray(value) ? ` at [${index}]` : ''}`
        throw new ConfigError(`${expected}, got ${given}`)
      }
      return bytes
    }),
  )
}

function parseSerializer(value: unknown): SessionSerializer {
  if (value === undefined || value === 'json' || value === 'v8' || value === 'msgpack') {
    return new SessionSerializer(value)
  }
  const custom = value as { serialize?: unknown; deserialize?: unknown } | null
  if (
    typeof custom === 'object' &&
    custom !== null &&
    typeof custom.serialize === 'function' &&
    typeof custom.deserialize === 'function'
  ) {
    return new SessionSerializer(custom as SerializerOption)
  }
  throw new ConfigError(
    `Expected \`serializer\` to be 'json', 'v8', 'msgpack' or an object with serialize and deserialize functions, got ${describe(value)}`,
  )
}

const NODE_ENTRY = /^([^:\s]+):(\[[0-9A-Fa-f:.]+\]|[^:\s[\]]+)(?::(\d{1,5}))?$/
const REDIS_ENTRY = /^([^:\s]+):(rediss?:\/\/\S+)$/

export function parseNodes(value: unknown): NodeConfig[] {
  let nodes: NodeConfig[]
  if (typeof value === 'string') {
    nodes = value
      .split(/[\s,]+/)
      .filter(Boolean)
      .map((entry) => {
        const redis = REDIS_ENTRY.exec(entry)
        if (redis) return redisNode(redis[1], redis[2], 'nodes')
        const match = NODE_ENTRY.exec(entry)
        if (!match) {
          throw new ConfigError(
            `Expected each entry of \`nodes\` to look like 'id:host:port' or 'id:redis://host:port', got '${withoutCredentials(entry)}'`,
          )
        }
        const [, id = '', host = '', port] = match
        return memcachedNode({
          id,
          host: host.replace(/^\[|\]$/g, ''),
          port: port === undefined ? 11211 : Number(port),
        })
      })
  } else if (Array.isArray(value)) {
    nodes = value.map((entry: unknown, index) => {
      const where = `nodes[${index}]`
      if (!isPlainObject(entry)) {
        throw new ConfigError(
          `Expected \`${where}\` to be { id, host, port }, { id, url }, { id, cluster } or { id, sentinels, name }, got ${describe(entry)}`,
        )
      }
      const fields = entry as Record<string, unknown>
      if (fields.cluster !== undefined) {
        checkNodeKeys(fields, NODE_FORMS.cluster, where)
        return clusterNode(fields.id, fields.cluster, where)
      }
      if (fields.sentinels !== undefined) {
        checkNodeKeys(fields, NODE_FORMS.sentinel, where)
        return sentinelNode(fields.id, fields.sentinels, fields.name, fields.masterUrl, where)
      }
      if (fields.url !== undefined) {
        checkNodeKeys(fields, NODE_FORMS.redis, where)
        return redisNode(fields.id, fields.url, where)
      }
      checkNodeKeys(fields, NODE_FORMS.memcached, where)
      return memcachedNode(
        {
          id: fields.id,
          host: fields.host,
          port: fields.port ?? 11211,
          username: fields.username,
          password: fields.password,
        },
        where,
      )
    })
  } else {
    throw new ConfigError(
      `Expected \`nodes\` to be a string like 'n1:10.0.0.1:11211 n2:10.0.0.2:11211' or an array of nodes, got ${describe(value)}`,
    )
  }
  if (nodes.length === 0) throw new ConfigError('Expected `nodes` to name at least one node, got none')
  const seen = new Set<string>()
  // Two ids for one server would put both copies of a session on it: one failure would lose both.
  const servers = new Map<string, string>()
  for (const node of nodes) {
    if (seen.has(node.id)) throw new ConfigError(`Expected node ids to be unique, got '${node.id}' twice`)
    seen.add(node.id)
    const server = serverOf(node)
    const other = server && servers.get(server)
    if (other !== undefined) {
      throw new ConfigError(
        `Expected every node to be a server of its own (the two copies of a session go on two nodes), got '${other}' and '${node.id}' both at ${server}`,
      )
    }
    if (server) servers.set(server, node.id)
  }
  return nodes
}

/** The host and port a memcached or single Redis node connects to; undefined for clusters and sentinels. */
function serverOf(node: NodeConfig): string | undefined {
  if (node.kind === 'memcached') return `${node.host.toLowerCase()}:${node.port}`
  if (node.kind !== 'redis') return undefined
  const url = new URL(node.url)
  return `${url.hostname.toLowerCase()}:${url.port || '6379'}`
}

function sentinelNode(
  rawId: unknown,
  sentinels: unknown,
  name: unknown,
  masterUrl: unknown,
  where: string,
): NodeConfig {
  const id = checkId(rawId, where)
  if (!Array.isArray(sentinels) || sentinels.length === 0) {
    throw new ConfigError(
      `Expected the sentinels of node '${id}' to be a non-empty array of redis://host:port URLs, got ${describe(sentinels)}`,
    )
  }
  if (typeof name !== 'string' || name.length === 0) {
    throw new ConfigError(
      `Expected the master name of node '${id}' (\`name\`) to be a non-empty string, got ${describe(name)}`,
    )
  }
  return Object.freeze({
    kind: 'redis-sentinel',
    id,
    name,
    sentinels: Object.freeze(sentinels.map((url) => redisUrl(id, url, { sentinel: true }))),
    masterUrl: masterUrl === undefined ? undefined : redisUrl(id, masterUrl),
  })
}

interface NodeForm {
  readonly kind: string
  readonly keys: readonly string[]
}

/** The keys of each object form of a node; the form is told by `cluster`, `sentinels` or `url`, else memcached. */
const NODE_FORMS = {
  memcached: {
    kind: 'a memcached node (no `url`, `cluster` or `sentinels`)',
    keys: ['id', 'host', 'port', 'username', 'password'],
  },
  redis: { kind: 'a Redis node', keys: ['id', 'url'] },
  cluster: { kind: 'a Redis Cluster node', keys: ['id', 'cluster'] },
  sentinel: { kind: 'a Sentinel node', keys: ['id', 'sentinels', 'name', 'masterUrl'] },
} as const satisfies Record<string, NodeForm>

/**
 * Refuses a key the node's form does not read, as unknown options are refused: a typo (`hots`, `sentinel`) or a
 * key of another form would otherwise be dropped and the node run with a default or fail on another key.
 */
function checkNodeKeys(fields: Record<string, unknown>, form: NodeForm, where: string): void {
  // A key set to undefined is not given, as the form is told (`url: cfg.url` with no url is a memcached node).
  const unknown = Object.keys(fields).find((key) => fields[key] !== undefined && !form.keys.includes(key))
  if (unknown === undefined) return
  // Named by its id when it has a valid one (as every other message about a node), else by its place.
  const node =
    typeof fields.id === 'string' && NODE_ID_PATTERN.test(fields.id) ? `node '${fields.id}'` : `\`${where}\``
  // Only the key is echoed, never a value (a value may be a password), and a key that looks like a URL is redacted.
  const key = withoutCredentials(unknown.length > 60 ? `${unknown.slice(0, 60)}…` : unknown)
  throw new ConfigError(
    `Expected ${node}, ${form.kind}, to have only the keys ${form.keys.join(', ')}, got \`${key}\``,
  )
}

function checkId(id: unknown, where: string): string {
  if (typeof id !== 'string' || !NODE_ID_PATTERN.test(id)) {
    throw new ConfigError(
      `Expected a node id in \`${where}\` to be 1-32 letters, digits or '_', got ${describe(id)}`,
    )
  }
  return id
}

function memcachedNode(
  raw: { id: unknown; host: unknown; port: unknown; username?: unknown; password?: unknown },
  where = 'nodes',
): NodeConfig {
  const id = checkId(raw.id, where)
  if (typeof raw.host !== 'string' || raw.host.length === 0) {
    throw new ConfigError(
      `Expected the host of node '${id}' to be a non-empty string, got ${describe(raw.host)}`,
    )
  }
  checkHost(id, raw.host, where)
  const port = raw.port
  if (typeof port !== 'number' || !Number.isInteger(port) || port < 1 || port > 65535) {
    throw new ConfigError(
      `Expected the port of node '${id}' to be an integer from 1 to 65535, got ${describe(port)}`,
    )
  }
  const { username, password } = raw
  if (username === undefined && password === undefined) {
    return Object.freeze({ kind: 'memcached', id, host: raw.host, port, credentials: undefined })
  }
  if (typeof username !== 'string' || username.length === 0 || typeof password !== 'string') {
    // Never echo a password.
    throw new ConfigError(
      `Expected node '${id}' to have both \`username\` (a non-empty string) and \`password\` (a string) for SASL, got ${describe(username)} and ${typeof password === 'string' ? 'a string' : describe(password)}`,
    )
  }
  return Object.freeze({
    kind: 'memcached',
    id,
    host: raw.host,
    port,
    credentials: Object.freeze({ username, password }),
  })
}

/** A host name: labels of letters, digits, '-' and '_' (some internal names have one), joined by dots. */
const HOST_NAME =
  /^[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?$/

/**
 * A memcached node's host: a host name or an IP address. Anything else would only fail at the first request, as
 * a node that never answers (503s), so the usual slips are named: 'localhost:11211' in the string form reads as
 * node 'localhost' at host '11211' (getaddrinfo takes a bare number for an IPv4 address), and a URL there reads
 * as node 'memcached' at host '//...'.
 */
function checkHost(id: string, host: string, where: string): void {
  if (isIP(host) !== 0) return
  const expected = `Expected the host of node '${id}' to be a host name or an IP address`
  if (/^\d+$/.test(host)) {
    // 'localhost:11211' or 'memcached:11211' (a host, no id), or 'n1:11211' (an id, no host).
    const hint =
      where !== 'nodes'
        ? ' (the port is its own field)'
        : /^[A-Za-z]{1,4}\d+$/.test(id)
          ? `: each entry of \`nodes\` is 'id:host:port', and this one has no host`
          : `: each entry of \`nodes\` begins with the node's id, as in 'n1:${id}:${host}'`
    throw new ConfigError(`${expected}, got the number '${host}'${hint}`)
  }
  if (!HOST_NAME.test(host)) {
    throw new ConfigError(`${expected}, got ${describe(host)}${hostHint(host, where === 'nodes')}`)
  }
}

/** What a host that is neither a host name nor an IP address was probably meant to be, in the form it came in. */
function hostHint(host: string, inString: boolean): string {
  if (host.includes('//')) {
    return inString
      ? ": a memcached node is written 'id:host:port', a Redis node 'id:redis://host:port'"
      : ': a Redis node is written { id, url }'
  }
  if (inString) return ''
  if (host.startsWith('[')) return ' (an IPv6 address without brackets here)'
  if (host.includes(':')) return ' (the port is its own field)'
  return ''
}

/** A cookie option that takes one of a few values, in any case as the cookie package reads it. */
function checkCookieChoice(
  name: string,
  value: unknown,
  allowed: ReadonlySet<unknown>,
  expected: string,
): void {
  if (value === undefined || allowed.has(typeof value === 'string' ? value.toLowerCase() : value)) return
  throw new ConfigError(`Expected \`cookie.${name}\` to be ${expected}, got ${describe(value)}`)
}

/**
 * An entry as it may be echoed in an error: everything between '//' and the last '@' hidden. A password may hold
 * an '@' or a '/' that was not percent-encoded, so neither the first '@' nor the end of the host says where it ends.
 */
function withoutCredentials(entry: string): string {
  const start = entry.indexOf('//')
  const at = entry.lastIndexOf('@')
  return start === -1 || at < start ? entry : `${entry.slice(0, start + 2)}***${entry.slice(at)}`
}

/** What is wrong with a string given as a Redis URL, without echoing any of it (it may hold a password). */
function whatUrl(parsed: URL | undefined): string {
  if (!parsed) return 'a string that is not a URL'
  if (parsed.protocol === 'redis:' || parsed.protocol === 'rediss:') return 'a URL without a host'
  return 'a URL of another scheme'
}

/** The one query parameter a Redis URL may carry: how its host name resolves (IPv6-only private networks). */
const ADDRESS_FAMILIES = new Set(['0', '4', '6'])

/**
 * `sentinel`: a sentinel's own URL, which takes credentials and TLS only. Nothing of a URL is echoed in these
 * messages but the names of its query parameters: it may hold a password, percent-encoded or not.
 */
function redisUrl(id: string, url: unknown, { sentinel = false } = {}): string {
  let parsed: URL | undefined
  try {
    parsed = typeof url === 'string' ? new URL(url) : undefined
  } catch {
    parsed = undefined
  }
  if (!parsed || (parsed.protocol !== 'redis:' && parsed.protocol !== 'rediss:') || !parsed.hostname) {
    throw new ConfigError(
      `Expected the url of node '${id}' to be redis://host:port or rediss://host:port (credentials allowed), got ${typeof url === 'string' ? whatUrl(parsed) : describe(url)}`,
    )
  }
  // ioredis reads a query string as client options, which would override the node's own (its offline queue, its
  // retries); only the address family is taken, by this library, and a fragment is no part of an address.
  const names = [...parsed.searchParams.keys()]
  const family = parsed.searchParams.get('family')
  if (
    parsed.hash ||
    names.some((name) => name !== 'family') ||
    names.length > 1 ||
    (family !== null && (sentinel || !ADDRESS_FAMILIES.has(family)))
  ) {
    throw new ConfigError(
      `Expected the url of node '${id}' to have no query string but ${sentinel ? 'none (a sentinel URL)' : "?family=0, 4 or 6 (ioredis would read others as client options overriding this node's own)"} and no fragment, got ${parsed.hash ? 'a fragment' : `?${names.map((name) => `${name}=…`).join('&')}`}`,
    )
  }
  if (!/^\/?(?:\d+)?$/.test(parsed.pathname) || (sentinel && parsed.pathname.length > 1)) {
    throw new ConfigError(
      `Expected the url of node '${id}' to end with ${sentinel ? 'its port (a sentinel has no database)' : 'a database number (/0, /1, …) or with its port'}, got another path`,
    )
  }
  try {
    decodeURIComponent(parsed.username)
    decodeURIComponent(parsed.password)
  } catch {
    throw new ConfigError(
      `Expected the credentials in the url of node '${id}' to be percent-encoded (a '%' written as %25), got a username or password that cannot be decoded`,
    )
  }
  return url as string
}

function redisNode(rawId: unknown, url: unknown, where: string): NodeConfig {
  const id = checkId(rawId, where)
  return Object.freeze({ kind: 'redis', id, url: redisUrl(id, url) })
}

function clusterNode(rawId: unknown, cluster: unknown, where: string): NodeConfig {
  const id = checkId(rawId, where)
  if (!Array.isArray(cluster) || cluster.length === 0) {
    throw new ConfigError(
      `Expected the cluster of node '${id}' to be a non-empty array of redis:// URLs, got ${describe(cluster)}`,
    )
  }
  return Object.freeze({
    kind: 'redis-cluster',
    id,
    cluster: Object.freeze(cluster.map((url) => redisUrl(id, url))),
  })
}

/** Node's longest timer: setTimeout() runs a longer delay after 1 ms. */
export const MAX_TIMER_MS = 2_147_483_647
/** Ten minutes: a node that takes longer is down; and a lock (at most lockExpiration's 86 400 s) must outlive it. */
const MAX_OPERATION_TIMEOUT_MS = 600_000

/**
 * A lock may lapse up to a second early (memcached counts whole seconds) and a write must end before it does,
 * so a lock must outlive one second plus an operation timeout.
 */
function lockExpiration(o: Record<string, unknown>): number {
  const operationTimeoutMs =
    typeof o.operationTimeout === 'number' && o.operationTimeout <= MAX_OPERATION_TIMEOUT_MS
      ? o.operationTimeout
      : 1000
  const min = Math.floor((operationTimeoutMs + 100) / 1000) + 2
  return optionalNumber(o, 'lockExpiration', Math.max(10, min), {
    min,
    max: 86_400,
    integer: true,
    unit: `seconds; at least 2 s more than operationTimeout`,
  })
}

const LOCKING_MODES = new Set(['none', 'all', 'auto', 'merge'])

function cookieName(o: Record<string, unknown>): string {
  const name = optionalString(
    o,
    'name',
    'connect.sid',
    /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/,
    'a cookie name token',
  )
  // Cookie parsers (cookie, @fastify/cookie) store what they parse in a plain object, where this name reads back
  // the object's prototype, never the value: every request would get a new session.
  if (name === '__proto__') {
    throw new ConfigError(
      "Expected `name` to be a cookie name token other than '__proto__', which cookie parsers cannot read back, got '__proto__'",
    )
  }
  return name
}

function parseLockingMode(value: unknown): LockingMode {
  if (value === undefined) return 'auto'
  if (
    (typeof value === 'string' && LOCKING_MODES.has(value)) ||
    value instanceof RegExp ||
    typeof value === 'function'
  ) {
    return value as LockingMode
  }
  throw new ConfigError(
    `Expected \`lockingMode\` to be 'none', 'all', 'auto', 'merge', a RegExp or a function of the request, got ${describe(value)}`,
  )
}

function parseFailoverNodes(value: unknown, nodes: readonly NodeConfig[] | undefined): ReadonlySet<string> {
  if (value === undefined) return new Set()
  const ids = typeof value === 'string' ? value.split(/[\s,]+/).filter(Boolean) : value
  if (!Array.isArray(ids) || !ids.every((id) => typeof id === 'string')) {
    throw new ConfigError(
      `Expected \`failoverNodes\` to be node ids as a string ('n3') or an array (['n3']), got ${describe(value)}`,
    )
  }
  if (!nodes) throw new ConfigError('Option `failoverNodes` needs `nodes`')
  const known = new Set(nodes.map((node) => node.id))
  for (const id of ids) {
    if (!known.has(id)) {
      throw new ConfigError(
        `Expected every id in \`failoverNodes\` to be a configured node (${[...known].join(', ')}), got '${id}'`,
      )
    }
  }
  const failover = new Set<string>(ids)
  if (failover.size === known.size) {
    throw new ConfigError('Expected at least one node that is not in `failoverNodes`, got all of them')
  }
  return failover
}

/** Names the option most likely meant (a typo, another case), or else every option there is. */
function unknownOption(key: string): string {
  const lower = key.toLowerCase()
  let closest: string | undefined
  let closestDistance = Number.POSITIVE_INFINITY
  for (const name of OPTION_NAMES) {
    const distance = editDistance(lower, name.toLowerCase())
    if (distance < closestDistance) {
      closest = name
      closestDistance = distance
    }
  }
  // Up to two edits for a longer name, one for a short one: short names are a few edits from too many others.
  if (closest !== undefined && closestDistance <= (key.length > 5 ? 2 : 1)) {
    return `Unknown option \`${key}\`: did you mean \`${closest}\`?`
  }
  return `Unknown option \`${key}\`; the options are ${[...OPTION_NAMES].map((name) => `\`${name}\``).join(', ')}`
}

/** Levenshtein distance, for option names (a few dozen characters): a row at a time. */
function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, index) => index)
  for (let i = 1; i <= a.length; i++) {
    const row = [i]
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1
      row.push(
        Math.min((previous[j] as number) + 1, (row[j - 1] as number) + 1, (previous[j - 1] as number) + cost),
      )
    }
    previous = row
  }
  return previous[b.length] as number
}

/** A per-process route when none is configured: takeovers are still detected, the LB just cannot route by it. */
function randomRoute(): string {
  return `r${randomBytes(6).toString('hex')}`
}

function parseSecrets(value: unknown): readonly string[] {
  const secrets = typeof value === 'string' ? [value] : value
  const expected = 'Expected `secret` to be a non-empty string or a non-empty array of non-empty strings'
  if (!Array.isArray(secrets) || secrets.length === 0 || value === '')
    throw new ConfigError(`${expected}, got ${describe(value)}`)
  const bad = secrets.findIndex((secret) => typeof secret !== 'string' || secret.length === 0)
  if (bad !== -1) {
    // Which entry, and what kind of value: never the value itself, which may be a secret.
    const entry = secrets[bad]
    const kind =
      entry === '' ? 'an empty string' : entry === null ? 'null' : `a value of type ${typeof entry}`
    throw new ConfigError(`${expected}, got ${kind} at \`secret[${bad}]\``)
  }
  return Object.freeze([...secrets])
}

function parseCookie(value: unknown): Readonly<CookieOptions> {
  if (value === undefined) return Object.freeze({})
  if (!isPlainObject(value)) {
    throw new ConfigError(`Expected \`cookie\` to be an object of cookie options, got ${describe(value)}`)
  }
  for (const key of Object.keys(value)) {
    const refused = REFUSED_COOKIE_OPTIONS[key]
    if (refused) throw new ConfigError(`\`cookie.${key}\` is not supported: ${refused}`)
    if (!KNOWN_COOKIE_OPTIONS.has(key)) throw new ConfigError(`Unknown cookie option \`cookie.${key}\``)
  }
  const cookie = value as CookieOptions
  // Checked by the cookie package only when a response's cookie is written, that is on every request: here once.
  checkCookieChoice('sameSite', cookie.sameSite, SAME_SITE, "true, false, 'lax', 'strict', 'none' or 'auto'")
  checkCookieChoice('priority', cookie.priority, PRIORITY, "'low', 'medium' or 'high'")
  if (
    cookie.domain !== undefined &&
    !(typeof cookie.domain === 'string' && COOKIE_DOMAIN.test(cookie.domain))
  ) {
    throw new ConfigError(`Expected \`cookie.domain\` to be a domain name, got ${describe(cookie.domain)}`)
  }
  for (const flag of ['httpOnly', 'partitioned'] as const) {
    if (cookie[flag] !== undefined && typeof cookie[flag] !== 'boolean') {
      throw new ConfigError(`Expected \`cookie.${flag}\` to be a boolean, got ${describe(cookie[flag])}`)
    }
  }
  if (cookie.secure !== undefined && typeof cookie.secure !== 'boolean' && cookie.secure !== 'auto') {
    throw new ConfigError(
      `Expected \`cookie.secure\` to be a boolean or 'auto', got ${describe(cookie.secure)}`,
    )
  }
  // Past 10^15 ms (about 31 700 years) the cookie's Expires is no date JavaScript can represent.
  if (
    cookie.maxAge != null &&
    (typeof cookie.maxAge !== 'number' || !(cookie.maxAge >= 0 && cookie.maxAge <= 1e15))
  ) {
    throw new ConfigError(
      `Expected \`cookie.maxAge\` to be a number of milliseconds from 0 to 10^15, got ${describe(cookie.maxAge)}`,
    )
  }
  if (
    cookie.expires != null &&
    !(cookie.expires instanceof Date && Number.isFinite(cookie.expires.getTime()))
  ) {
    throw new ConfigError(
      `Expected \`cookie.expires\` to be a valid Date (or use \`cookie.maxAge\`), got ${describe(cookie.expires)}`,
    )
  }
  if (
    cookie.path !== undefined &&
    (typeof cookie.path !== 'string' || !cookie.path.startsWith('/') || !COOKIE_PATH.test(cookie.path))
  ) {
    throw new ConfigError(
      `Expected \`cookie.path\` to be a path starting with '/', of printable ASCII without ';', got ${describe(cookie.path)}`,
    )
  }
  // Browsers refuse a Partitioned cookie that is not Secure: every response's cookie would be dropped.
  if (cookie.partitioned === true && cookie.secure !== true && cookie.secure !== 'auto') {
    throw new ConfigError(
      `A partitioned cookie must be secure: expected \`cookie.secure\` to be true or 'auto' with \`cookie.partitioned\`, got ${describe(cookie.secure)}`,
    )
  }
  // The cookie package takes either case; the 'auto' this library resolves is compared in lower case.
  const sameSite = typeof cookie.sameSite === 'string' ? cookie.sameSite.toLowerCase() : cookie.sameSite
  return Object.freeze({ ...cookie, ...(sameSite === undefined ? {} : { sameSite }) } as CookieOptions)
}

function parseLogger(value: unknown): Logger {
  if (value === undefined) return silentLogger
  const methods = ['debug', 'info', 'warn', 'error'] as const
  if (
    typeof value !== 'object' ||
    value === null ||
    !methods.every((m) => typeof (value as Record<string, unknown>)[m] === 'function')
  ) {
    throw new ConfigError(
      `Expected \`logger\` to have debug, info, warn and error methods (pino-compatible), got ${describe(value)}`,
    )
  }
  return value as Logger
}

function optionalBoolean(o: Record<string, unknown>, key: string, fallback: boolean): boolean {
  const value = o[key]
  if (value === undefined) return fallback
  if (typeof value !== 'boolean')
    throw new ConfigError(`Expected \`${key}\` to be a boolean, got ${describe(value)}`)
  return value
}

function optionalString(
  o: Record<string, unknown>,
  key: string,
  fallback: string,
  pattern: RegExp,
  expected: string,
): string {
  const value = o[key]
  if (value === undefined) return fallback
  if (typeof value !== 'string' || !pattern.test(value)) {
    throw new ConfigError(`Expected \`${key}\` to be ${expected}, got ${describe(value)}`)
  }
  return value
}

function optionalNumber(
  o: Record<string, unknown>,
  key: string,
  fallback: number,
  rule: { min: number; max?: number; integer?: boolean; unit: string },
): number {
  const value = o[key]
  if (value === undefined) return fallback
  const inRange =
    typeof value === 'number' &&
    Number.isFinite(value) &&
    value >= rule.min &&
    (rule.max === undefined || value <= rule.max) &&
    (!rule.integer || Number.isInteger(value))
  if (!inRange) {
    const range = rule.max === undefined ? `from ${rule.min} and up` : `from ${rule.min} to ${rule.max}`
    const kind = rule.integer ? 'an integer' : 'a number'
    throw new ConfigError(`Expected \`${key}\` to be ${kind} ${range} (${rule.unit}), got ${describe(value)}`)
  }
  return value
}

function isPlainObject(value: unknown): value is object {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return false
  const proto = Object.getPrototypeOf(value)
  return proto === Object.prototype || proto === null
}

/** `0` (number), `'x'` (string): what was given, and its type, for error messages. */
export function describe(value: unknown): string {
  if (value === null) return '`null`'
  if (value === undefined) return '`undefined` (undefined)'
  if (typeof value === 'string')
    return `\`'${value.length > 60 ? `${value.slice(0, 60)}…` : value}'\` (string)`
  if (typeof value === 'function') return 'a function'
  if (Array.isArray(value)) return `an array of ${value.length}`
  if (typeof value === 'object') return 'an object'
  return `\`${String(value)}\` (${typeof value})`
}
