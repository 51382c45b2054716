const probe = Symbol('session-failover dictionary mode')

/**
 * Moves an Express request or response to dictionary-mode properties, by adding one property and deleting it.
 *
 * Why: Express gives each request and response its app's prototype (`Object.setPrototypeOf`), and from then on V8
 * shares no hidden class between them. Each property then stored on one (by this middleware, by Express, by
 * Node's http code) copies its whole map, about 45 properties for a response, and each inline cache that touches
 * it sees a map it has never seen. In dictionary mode a store is a hash insert, and the objects of one prototype
 * share one map. Measured A/B with `npm run bench` (sticky reads, ~200 B sessions): about a quarter less app
 * CPU per request (about 375 to 275 µs), most of it saved outside this library.
 *
 * Where V8 can undo the add instead (an object whose map has a parent, as without `setPrototypeOf`), nothing
 * changes; should a V8 version do so here too, only the speed is lost.
 */
export function toDictionaryMode(object: object): void {
  const target = object as Record<symbol, unknown>
  target[probe] = true
  delete target[probe]
}
