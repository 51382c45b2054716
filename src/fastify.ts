export { type FastifySessionFailoverOptions, fastifySessionFailover } from './fastify/plugin.js'
export { FastifySession } from './fastify/session.js'
