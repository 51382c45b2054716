/** The session layers bench/app.ts can serve with: the peers, then session-failover's modes. */
export const LAYERS = [
  'express-session/memory',
  'connect-memcached',
  'connect-redis',
  'session-failover/sticky',
  'session-failover/none',
  'session-failover/auto',
  'session-failover/merge',
  'fastify/@fastify/session-memory',
  'fastify/session-failover',
] as const
export type Layer = (typeof LAYERS)[number]
