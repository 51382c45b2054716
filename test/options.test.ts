import { readFileSync } from 'node:fs'
import { describe, expect, it } from 'vitest'
import { ConfigError } from '../src/errors.js'
import { OPTION_NAMES, parseOptions } from '../src/options.js'

const nodes = 'n1:127.0.0.1:11211 n2:127.0.0.1:11212'

function message(options: unknown, env?: string): string {
  try {
    parseOptions(options, env)
  } catch (error) {
    expect(error).toBeInstanceOf(ConfigError)
    expect((error as ConfigError).code).toBe('ESF_CONFIG')
    return (error as Error).message
  }
  throw new Error('expected a ConfigError')
}

describe('options', () => {
  it('fills every default, like express-session where it has one', () => {
    const config = parseOptions({ secret: 's', nodes })
    expect(config).toMatchObject({
      secrets: ['s'],
      name: 'connect.sid',
      rolling: false,
      resave: false,
      saveUninitialized: false,
      proxy: undefined,
      unsetDestroy: false,
      prefix: 'sf:',
      ttlSeconds: 86_400,
      operationTimeoutMs: 1000,
      nodeProbeIntervalMs: 2000,
      touchAfter: 0.1,
      backupCheckIntervalMs: 60_000,
    })
    expect(config.nodes).toEqual([
      { kind: 'memcached', id: 'n1', host: '127.0.0.1', port: 11211 },
      { kind: 'memcached', id: 'n2', host: '127.0.0.1', port: 11212 },
    ])
    expect(Object.isFrozen(config)).toBe(true)
  })

  it('reads nodes as a string (spaces or commas, IPv6 in brackets, default port) or an array', () => {
    expect(parseOptions({ secret: 's', nodes: 'a:h1:1,b:[::1]:2 c:h3' }).nodes).toEqual([
      { kind: 'memcached', id: 'a', host: 'h1', port: 1 },
      { kind: 'memcached', id: 'b', host: '::1', port: 2 },
      { kind: 'memcached', id: 'c', host: 'h3', port: 11211 },
    ])
    expect(parseOptions({ secret: 's', nodes: [{ id: 'x', host: 'h', port: 5 }] }).nodes).toEqual([
      { kind: 'memcached', id: 'x', host: 'h', port: 5 },
    ])
  })

  it('reads Redis nodes (redis://, rediss://, credentials, a cluster) beside memcached ones', () => {
    const nodes = 'm1:10.0.0.1:11211 r1:redis://10.0.0.2:6379 r2:rediss://user:pw@10.0.0.3:6380/2'
    expect(parseOptions({ secret: 's', nodes }).nodes).toEqual([
      { kind: 'memcached', id: 'm1', host: '10.0.0.1', port: 11211 },
      { kind: 'redis', id: 'r1', url: 'redis://10.0.0.2:6379' },
      { kind: 'redis', id: 'r2', url: 'rediss://user:pw@10.0.0.3:6380/2' },
    ])
    expect(
      parseOptions({
        secret: 's',
        nodes: [{ id: 's1', sentinels: ['redis://10.0.0.6:26379'], name: 'main' }],
      }).nodes,
    ).toEqual([{ kind: 'redis-sentinel', id: 's1', sentinels: ['redis://10.0.0.6:26379'], name: 'main' }])
    const cluster = ['redis://10.0.0.4:7000', 'redis://10.0.0.5:7000']
    expect(
      parseOptions({
        secret: 's',
        nodes: [
          { id: 'c1', cluster },
          { id: 'r', url: 'redis://h:1' },
        ],
      }).nodes,
    ).toEqual([
      { kind: 'redis-cluster', id: 'c1', cluster },
      { kind: 'redis', id: 'r', url: 'redis://h:1' },
    ])
  })

  it('takes host names (dots, dashes, underscores) and IP addresses as memcached hosts', () => {
    const nodes = 'a:cache-1.internal:1 b:my_host c:10.0.0.1 d:[fe80::1]:4'
    expect(
      parseOptions({ secret: 's', nodes }).nodes?.map((node) => node.kind === 'memcached' && node.host),
    ).toEqual(['cache-1.internal', 'my_host', '10.0.0.1', 'fe80::1'])
    expect(parseOptions({ secret: 's', nodes: [{ id: 'x', host: '::1', port: 5 }] }).nodes).toHaveLength(1)
  })

  it.each([
    [
      { nodes },
      'Expected `secret` to be a non-empty string or a non-empty array of non-empty strings, got `undefined`',
    ],
    [{ secret: [], nodes }, 'got an array of 0'],
    [
      { secret: 's', nodes: 'n1:h:99999' },
      "port of node 'n1' to be an integer from 1 to 65535, got `99999` (number)",
    ],
    [{ secret: 's', nodes: 'n-1:h:1' }, "got `'n-1'` (string)"],
    [{ secret: 's', nodes: 'n1:h:1 n1:h:2' }, "Expected node ids to be unique, got 'n1' twice"],
    [{ secret: 's', nodes: 'n1' }, "to look like 'id:host:port' or 'id:redis://host:port', got 'n1'"],
    [
      { secret: 's', nodes: [{ id: 'r', url: 'http://secret@h:1' }] },
      "Expected the url of node 'r' to be redis://host:port",
    ],
    [
      { secret: 's', nodes: [{ id: 'c', cluster: [] }] },
      "Expected the cluster of node 'c' to be a non-empty array",
    ],
    // Checked by the cookie package only when a cookie is written: every request would fail.
    [
      { secret: 's', nodes, cookie: { sameSite: 'bogus' } },
      "Expected `cookie.sameSite` to be true, false, 'lax'",
    ],
    [
      { secret: 's', nodes, cookie: { priority: 'urgent' } },
      "Expected `cookie.priority` to be 'low', 'medium'",
    ],
    [
      { secret: 's', nodes, cookie: { domain: 'bad domain;x' } },
      'Expected `cookie.domain` to be a domain name',
    ],
    [
      { secret: 's', nodes, cookie: { path: '/a;b' } },
      "Expected `cookie.path` to be a path starting with '/', of printable ASCII without ';', got `'/a;b'`",
    ],
    [{ secret: 's', nodes, cookie: { path: '/café' } }, 'of printable ASCII'],
    [
      { secret: 's', nodes, cookie: { partitioned: true } },
      "A partitioned cookie must be secure: expected `cookie.secure` to be true or 'auto' with `cookie.partitioned`, got `undefined` (undefined)",
    ],
    [{ secret: 's', nodes, cookie: { httpOnly: 'yes' } }, 'Expected `cookie.httpOnly` to be a boolean'],
    [
      { secret: 's', nodes: 'n1:Cache1:11211 n2:cache1:11211' },
      "Expected every node to be a server of its own (the two copies of a session go on two nodes), got 'n1' and 'n2' both at cache1:11211",
    ],
    [
      {
        secret: 's',
        nodes: [
          { id: 'a', url: 'redis://h:6379/1' },
          { id: 'b', url: 'redis://h/2' },
        ],
      },
      "got 'a' and 'b' both at h:6379",
    ],
    [{ secret: 's', nodes, cookie: { encode: String } }, '`cookie.encode` is not supported'],
    [{ secret: 's', nodes, cookie: { signed: true } }, '`cookie.signed` is not supported'],
    // A raw '%' passes URL parsing but not ioredis's decoding: a URIError at start-up, without this check.
    [
      { secret: 's', nodes: [{ id: 'r', url: 'redis://app:50%off@h:1' }] },
      "Expected the credentials in the url of node 'r' to be percent-encoded (a '%' written as %25)",
    ],
    [{ secret: 's', nodes: '' }, 'at least one node'],
    [{ secret: 's', nodes: 42 }, 'got `42` (number)'],
    [
      { secret: 's', nodes, operationTimeout: 0 },
      'Expected `operationTimeout` to be a number from 1 to 600000 (milliseconds), got `0` (number)',
    ],
    // Meant as "never": Node would run such a timer after 1 ms, and every operation would time out.
    [
      { secret: 's', nodes, operationTimeout: 1e10 },
      'Expected `operationTimeout` to be a number from 1 to 600000 (milliseconds), got `10000000000` (number)',
    ],
    [
      { secret: 's', nodes, lockTimeout: 3e9 },
      'Expected `lockTimeout` to be a number from 1 to 2147483647 (milliseconds), got `3000000000` (number)',
    ],
    [
      { secret: 's', nodes, nodeProbeInterval: 3e9 },
      'Expected `nodeProbeInterval` to be a number from 1 to 2147483647 (milliseconds)',
    ],
    [
      { secret: 's', nodes, cookie: { expires: new Date(Number.NaN) } },
      'Expected `cookie.expires` to be a valid Date (or use `cookie.maxAge`), got an object',
    ],
    [
      { secret: 's', nodes, cookie: { expires: '2030-01-01' } },
      "Expected `cookie.expires` to be a valid Date (or use `cookie.maxAge`), got `'2030-01-01'` (string)",
    ],
    [
      { secret: 's', nodes, touchAfter: 2 },
      'Expected `touchAfter` to be a number from 0 to 1 (fraction of the TTL), got `2` (number)',
    ],
    [
      { secret: 's', nodes, ttl: 1.5 },
      'Expected `ttl` to be an integer from 1 to 31536000 (seconds), got `1.5` (number)',
    ],
    [
      { secret: 's', nodes, unset: 'drop' },
      "Expected `unset` to be 'keep' or 'destroy', got `'drop'` (string)",
    ],
    [{ secret: 's', nodes, rolling: 'yes' }, 'Expected `rolling` to be a boolean'],
    [{ secret: 's', nodes, prefix: 'has space' }, 'Expected `prefix` to be up to 100 printable ASCII'],
    [
      { secret: 's', nodes, cookie: { maxAge: -1 } },
      'Expected `cookie.maxAge` to be a number of milliseconds from 0 to 10^15, got `-1`',
    ],
    [
      { secret: 's', nodes, cookie: { maxAge: Number.POSITIVE_INFINITY } },
      'Expected `cookie.maxAge` to be a number of milliseconds from 0 to 10^15, got `Infinity`',
    ],
    [{ secret: 's', nodes, cookie: { maxage: 1 } }, 'Unknown cookie option `cookie.maxage`'],
    [
      { secret: 's', nodes, operationTimout: 5 },
      'Unknown option `operationTimout`: did you mean `operationTimeout`?',
    ],
    [{ secret: 's', node: 'n1:h:1' }, 'Unknown option `node`: did you mean `nodes`?'],
    [
      { secret: 's', nodes, lockingmode: 'auto' },
      'Unknown option `lockingmode`: did you mean `lockingMode`?',
    ],
    [{ secret: 's', nodes, flavour: 1 }, 'Unknown option `flavour`; the options are `secret`, `nodes`, '],
    // @fastify/session's names.
    [{ secret: 's', nodes, cookieName: 'sid' }, 'Option `cookieName` is not supported: use `name`'],
    [
      { secret: 's', nodes, idGenerator: () => 'x' },
      'Option `idGenerator` is not supported: session ids carry',
    ],
    // Which entry, never its value.
    [{ secret: ['rotated-out', ''], nodes }, 'got an empty string at `secret[1]`'],
    [{ secret: ['current', 12345678], nodes }, 'got a value of type number at `secret[1]`'],
    // A node address that would only fail as 503s at the first request.
    [
      { secret: 's', nodes: 'localhost:11211' },
      "Expected the host of node 'localhost' to be a host name or an IP address, got the number '11211': each entry of `nodes` begins with the node's id, as in 'n1:localhost:11211'",
    ],
    [
      { secret: 's', nodes: [{ id: 'n1', host: '127.0.0.1:11211' }] },
      "Expected the host of node 'n1' to be a host name or an IP address, got `'127.0.0.1:11211'` (string) (the port is its own field)",
    ],
    [
      { secret: 's', nodes: [{ id: 'n1', host: '11211' }] },
      "got the number '11211' (the port is its own field)",
    ],
    [
      { secret: 's', nodes: 'memcached://127.0.0.1:11211' },
      "got `'//127.0.0.1'` (string): a memcached node is written 'id:host:port', a Redis node 'id:redis://host:port'",
    ],
    [
      { secret: 's', nodes: 'n1:redis//127.0.0.1:6379' },
      "got `'redis//127.0.0.1'` (string): a memcached node",
    ],
    [
      { secret: 's', nodes: [{ id: 'n1', host: 'a/b', port: 1 }] },
      "to be a host name or an IP address, got `'a/b'`",
    ],
    [{ secret: 's', nodes: [{ id: 'n1', host: '[::1]' }] }, '(an IPv6 address without brackets here)'],
    [{ secret: 's', nodes: [{ id: 'n1', host: 'redis://h:1' }] }, ': a Redis node is written { id, url }'],
    [{ secret: '', nodes }, "non-empty array of non-empty strings, got `''` (string)"],
    [{ secret: 's', nodes: [{ id: 'r', url: 'http://u:p@h:1' }] }, 'got a URL of another scheme'],
    // What 'redis://${REDIS_HOST}' becomes with the variable unset.
    [{ secret: 's', nodes: [{ id: 'r', url: 'redis://' }] }, 'got a URL without a host'],
    [{ secret: 's', nodes: 'r1:redis:///0' }, 'got a URL without a host'],
    [
      { secret: 's', nodes: 'n1:11211' },
      "got the number '11211': each entry of `nodes` is 'id:host:port', and this one has no host",
    ],
    [{ secret: 's', nodes: 'memcached:11211' }, "begins with the node's id, as in 'n1:memcached:11211'"],
    // Read from the object itself, not its prototype.
    [{ secret: 's', nodes, constructor: 1 }, 'Unknown option `constructor`'],
    [{ secret: 's', nodes, store: {} }, 'Option `store` is not supported'],
    [{ secret: 's', nodes, genid: () => 'x' }, 'Option `genid` is not supported'],
    [{ secret: 's', nodes, sticky: 'yes' }, 'Expected `sticky` to be a boolean'],
    [{ secret: 's', nodes, route: 'a' }, 'Option `route` needs `sticky: true`'],
    [{ secret: 's', nodes, backupAsync: true }, 'Option `backupAsync` needs `sticky: true`'],
    [
      { secret: 's', nodes, sticky: true, route: 'a.b' },
      "Expected `route` to be 1-32 letters, digits or '_', got `'a.b'`",
    ],
    [
      { secret: 's', nodes, sticky: true, localMaxSessions: 0 },
      'Expected `localMaxSessions` to be an integer from 1 and up',
    ],
    [
      { secret: 's', nodes, sticky: true, localMaxBytes: 10 },
      'Expected `localMaxBytes` to be an integer from 1024 and up',
    ],
    [{ secret: 's', nodes, failoverNodes: 'n7' }, "to be a configured node (n1, n2), got 'n7'"],
    [{ secret: 's', nodes, failoverNodes: ['n1', 'n2'] }, 'at least one node that is not in `failoverNodes`'],
    [{ secret: 's', nodes, failoverNodes: 3 }, 'Expected `failoverNodes` to be node ids'],
    [{ secret: 's', failoverNodes: 'n1' }, 'Option `failoverNodes` needs `nodes`'],
    [
      { secret: 's', nodes, lockingMode: 'sometimes' },
      "Expected `lockingMode` to be 'none', 'all', 'auto', 'merge', a RegExp or a function",
    ],
    [
      { secret: 's', nodes, lockTimeoutAction: 'maybe' },
      "Expected `lockTimeoutAction` to be 'fail' or 'proceed'",
    ],
    [
      { secret: 's', nodes, lockExpiration: 0.5 },
      'Expected `lockExpiration` to be an integer from 3 to 86400 (seconds; at least 2 s more than operationTimeout)',
    ],
    [
      { secret: 's', nodes, sticky: true, lockingMode: 'all' },
      'Option `lockingMode` applies to non-sticky mode',
    ],
    [
      { secret: 's', nodes, logger: console.log },
      'Expected `logger` to have debug, info, warn and error methods',
    ],
    [
      { secret: 's', nodes, storeKeys: 'short' },
      'Expected `storeKeys` to be a string or Uint8Array of at least 16 bytes',
    ],
    [{ secret: 's', nodes, storeKeys: [] }, 'or a non-empty array of them, got an empty array'],
    [{ secret: 's', nodes, storeKeys: 42 }, 'got `42` (number)'],
    [{ secret: 's', nodes, encrypt: 'yes' }, "Expected `encrypt` to be a boolean, got `'yes'` (string)"],
    [
      { secret: 's', nodes, serializer: 'yaml' },
      "Expected `serializer` to be 'json', 'v8', 'msgpack' or an object with serialize and deserialize functions, got `'yaml'`",
    ],
    [{ secret: 's', nodes, serializer: { serialize: JSON.stringify } }, 'got an object'],
    [
      { secret: 's', nodes, maxSessionBytes: 100 },
      'Expected `maxSessionBytes` to be an integer from 1024 to 536870912 (bytes), got `100` (number)',
    ],
    [
      { secret: 's', nodes, absoluteTimeout: 0 },
      'Expected `absoluteTimeout` to be an integer from 1 to 31536000 (seconds), got `0` (number)',
    ],
    [
      { secret: 's', nodes: [{ id: 'm', host: 'h', username: 'shop' }] },
      "Expected node 'm' to have both `username` (a non-empty string) and `password` (a string) for SASL",
    ],
    ['s', 'Expected options to be an object like { secret, nodes }'],
    [
      { secret: 's', nodes, name: '__proto__' },
      "Expected `name` to be a cookie name token other than '__proto__', which cookie parsers cannot read back, got '__proto__'",
    ],
  ])('rejects %j with a message saying what was expected and given', (options, expected) => {
    expect(message(options)).toContain(expected)
  })

  it('never repeats a password from a malformed entry of `nodes` in its message', () => {
    const text = message({ secret: 's', nodes: 'r1:valkey://app:s3cret@10.0.0.3:6380' })
    expect(text).toContain("got 'r1:valkey://***@10.0.0.3:6380'")
    expect(text).not.toContain('s3cret')
  })

  it.each([
    [
      { id: 'a', hots: '10.0.0.1', port: 11211 },
      "Expected node 'a', a memcached node (no `url`, `cluster` or `sentinels`), to have only the keys id, host, port, username, password, got `hots`",
    ],
    // `sentinel` for `sentinels`: read as a memcached node without a host, which named the host, not the typo.
    [
      { id: 's1', sentinel: ['redis://10.0.0.6:26379'], name: 'main' },
      "Expected node 's1', a memcached node (no `url`, `cluster` or `sentinels`), to have only the keys id, host, port, username, password, got `sentinel`",
    ],
    [
      { id: 's1', sentinels: ['redis://10.0.0.6:26379'], name: 'main', masterURL: 'redis://:pw@m/1' },
      "Expected node 's1', a Sentinel node, to have only the keys id, sentinels, name, masterUrl, got `masterURL`",
    ],
    [
      { id: 'r', url: 'redis://h:1', host: 'h' },
      "Expected node 'r', a Redis node, to have only the keys id, url, got `host`",
    ],
    [
      { id: 'c', cluster: ['redis://h:7000'], url: 'redis://h:7000' },
      "Expected node 'c', a Redis Cluster node, to have only the keys id, cluster, got `url`",
    ],
    // No valid id to name it by: its place in `nodes`.
    [
      { ID: 'a', host: 'h' },
      'Expected `nodes[0]`, a memcached node (no `url`, `cluster` or `sentinels`), to have only the keys id, host, port, username, password, got `ID`',
    ],
  ])('refuses an unknown key in a node given as an object (%j), naming the node, the key and the accepted keys', (node, expected) => {
    expect(message({ secret: 's', nodes: [node] })).toBe(expected)
  })

  it('takes a key of another node form set to undefined as not given, as the form itself is told', () => {
    const url: string | undefined = undefined
    const parsed = parseOptions({
      secret: 's',
      nodes: [
        { id: 'm1', host: '127.0.0.1', port: 11211, url },
        { id: 's1', sentinels: ['redis://127.0.0.1:26379'], name: 'main', cluster: undefined },
      ],
    })
    expect(parsed.nodes?.map((node) => [node.id, node.kind])).toEqual([
      ['m1', 'memcached'],
      ['s1', 'redis-sentinel'],
    ])
  })

  it('never echoes the value of an unknown key in a node (it may be a password)', () => {
    const text = message({
      secret: 's',
      nodes: [{ id: 'm', host: 'h', username: 'shop', passwd: 'hunter2' }],
    })
    expect(text).toContain('got `passwd`')
    expect(text).not.toContain('hunter2')
  })

  it('lists every object form of a node, the Sentinel one too, when an entry of `nodes` is not an object', () => {
    expect(message({ secret: 's', nodes: ['n1:h:1'] })).toBe(
      "Expected `nodes[0]` to be { id, host, port }, { id, url }, { id, cluster } or { id, sentinels, name }, got `'n1:h:1'` (string)",
    )
  })

  it('reads the sticky options with their defaults, and a random route when none is given', () => {
    const a = parseOptions({ secret: 's', nodes, sticky: true })
    const b = parseOptions({ secret: 's', nodes, sticky: true })
    expect(a.sticky).toMatchObject({
      backupAsync: false,
      localMaxSessions: 10_000,
      localMaxBytes: 64 * 1024 * 1024,
    })
    expect(a.sticky?.route).toMatch(/^r[0-9a-f]{12}$/)
    expect(a.sticky?.route).not.toBe(b.sticky?.route)
    expect(parseOptions({ secret: 's', nodes, sticky: true, route: 'app1' }).sticky?.route).toBe('app1')
    expect(parseOptions({ secret: 's', nodes }).sticky).toBeUndefined()
    expect([...parseOptions({ secret: 's', nodes, failoverNodes: 'n2' }).failoverNodeIds]).toEqual(['n2'])
  })

  it("defaults to lockingMode 'auto', and takes a RegExp or a function", () => {
    expect(parseOptions({ secret: 's', nodes }).locking).toEqual({
      mode: 'auto',
      lockTimeoutMs: 3000,
      lockExpirationSeconds: 10,
      lockTimeoutAction: 'fail',
    })
    const pattern = /^POST /
    expect(parseOptions({ secret: 's', nodes, lockingMode: pattern }).locking?.mode).toBe(pattern)
    const decide = () => true
    expect(parseOptions({ secret: 's', nodes, lockingMode: decide }).locking?.mode).toBe(decide)
    expect(parseOptions({ secret: 's', nodes, sticky: true }).locking).toBeUndefined()
  })

  it('treats a RegExp lockingMode the same on every request, whatever its flags', async () => {
    const { LockingPolicy } = await import('../src/core/locking-policy.js')
    const policy = new LockingPolicy(/^POST /g)
    const request = { method: 'POST', path: '/cart', raw: {} }
    expect([1, 2, 3].map(() => policy.shouldLock(request))).toEqual([true, true, true])
  })

  it("learns routes in 'auto' mode with id segments (numbers, uuids, long tokens) as one route", async () => {
    const { LockingPolicy } = await import('../src/core/locking-policy.js')
    const policy = new LockingPolicy('auto')
    const facts = (path: string, method = 'GET') => ({ method, path, raw: {} })
    for (const path of [
      '/users/42/orders/7',
      '/files/123e4567-e89b-12d3-a456-426614174000',
      '/share/AbCdEfGhIjKlMnOpQrStUv_-',
    ]) {
      policy.learn(facts(path), false)
    }
    // Other ids on the same routes: learned as read-only, so not locked.
    expect(policy.shouldLock(facts('/users/9/orders/1000'))).toBe(false)
    expect(policy.shouldLock(facts('/files/00000000-0000-0000-0000-000000000000'))).toBe(false)
    expect(policy.shouldLock(facts('/share/ZZZZZZZZZZZZZZZZZZZZZZZZZZZ'))).toBe(false)
    // Not ids (a word, a short mixed segment, part of a segment), another method: other routes, still locked.
    expect(policy.shouldLock(facts('/users/me/orders/7'))).toBe(true)
    expect(policy.shouldLock(facts('/users/42x/orders/7'))).toBe(true)
    expect(policy.shouldLock(facts('/files/123e4567-e89b-12d3-a456-426614174000.txt'))).toBe(true)
    expect(policy.shouldLock(facts('/users/42/orders/7', 'POST'))).toBe(true)
    // Only whole segments are ids: a number or uuid inside a segment keeps the segment as it is.
    policy.learn(facts('/a/x42'), false)
    expect(policy.shouldLock(facts('/a/x43'))).toBe(true)
    policy.learn(facts('/f/123e4567-e89b-12d3-a456-426614174000.txt'), false)
    expect(policy.shouldLock(facts('/f/00000000-0000-0000-0000-000000000000.txt'))).toBe(true)
    // A route that wrote is locked again, and stays locked after a request on it that did not write.
    policy.learn(facts('/users/5/orders/6'), true)
    expect(policy.shouldLock(facts('/users/42/orders/7'))).toBe(true)
    policy.learn(facts('/users/5/orders/6'), false)
    expect(policy.shouldLock(facts('/users/42/orders/7'))).toBe(true)
    // A path too long to keep is never learned: it always locks.
    const long = `/search${'/a'.repeat(300)}`
    policy.learn(facts(long), false)
    expect(policy.shouldLock(facts(long))).toBe(true)
  })

  it("remembers at most 2000 read-only routes in 'auto' mode, forgetting the one seen longest ago", async () => {
    const { LockingPolicy } = await import('../src/core/locking-policy.js')
    const policy = new LockingPolicy('auto')
    const facts = (path: string) => ({ method: 'GET', path, raw: {}, route: undefined })
    for (let i = 0; i < 2000; i++) policy.learn(facts(`/p/r${i}`), false)
    // Seen again: the most recent now, so the next route learned pushes out the one after it.
    policy.learn(facts('/p/r0'), false)
    policy.learn(facts('/one/more'), false)
    expect(policy.shouldLock(facts('/p/r0'))).toBe(false)
    expect(policy.shouldLock(facts('/p/r1'))).toBe(true)
    expect(policy.shouldLock(facts('/p/r2'))).toBe(false)
    expect(policy.shouldLock(facts('/p/r1999'))).toBe(false)
    expect(policy.shouldLock(facts('/one/more'))).toBe(false)
  })

  it('refuses to start without nodes in production, naming what to configure', () => {
    expect(message({ secret: 's' }, 'production')).toContain('Set `nodes`')
    expect(parseOptions({ secret: 's' }, 'development').nodes).toBeUndefined()
  })

  it('are all documented in the README options table', () => {
    const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8')
    const documented = new Set([...readme.matchAll(/^\| `(\w+)` \|/gm)].map((match) => match[1]))
    expect([...OPTION_NAMES].filter((name) => !documented.has(name))).toEqual([])
  })

  it('reads the stored-session options: keys from the secret unless given, json, no absolute lifetime', () => {
    const defaults = parseOptions({ secret: ['new', 'old'], nodes })
    expect(defaults).toMatchObject({
      storeSecrets: ['new', 'old'],
      encrypt: false,
      maxSessionBytes: 1_047_552,
      absoluteTimeoutMs: undefined,
    })
    expect(defaults.serializer.tag).toBe(1)
    const given = parseOptions({
      secret: 's',
      nodes: [{ id: 'm', host: 'h', username: 'shop', password: 'sesame' }],
      storeKeys: ['k'.repeat(16), new Uint8Array(32)],
      encrypt: true,
      serializer: 'v8',
      maxSessionBytes: 4096,
      absoluteTimeout: 3600,
    })
    expect(given).toMatchObject({ encrypt: true, maxSessionBytes: 4096, absoluteTimeoutMs: 3_600_000 })
    expect(given.storeSecrets).toEqual([Buffer.from('k'.repeat(16)), Buffer.alloc(32)])
    expect(given.serializer.tag).toBe(2)
    expect(given.nodes?.[0]).toMatchObject({ credentials: { username: 'shop', password: 'sesame' } })
  })

  it('never echoes a secret or a node password in an error', () => {
    expect(message({ secret: 's', nodes, storeKeys: ['k'.repeat(16), 'tooshort'] })).not.toContain('tooshort')
    expect(
      message({ secret: 's', nodes: [{ id: 'm', host: 'h', username: '', password: 'hunter2' }] }),
    ).not.toContain('hunter2')
    expect(message({ secret: ['good-secret', ''], nodes })).not.toContain('good-secret')
    expect(message({ secret: 's', nodes: [{ id: 'r', url: 'http://user:hunter2@h:1' }] })).not.toContain(
      'hunter2',
    )
  })
})
