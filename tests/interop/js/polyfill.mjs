// Node 20 lacks Promise.withResolvers (it arrived in Node 22), and js-libp2p 2.10's peer
// store locks (mortice -> it-queue) call it. Debian's nodejs, which CI installs, is 20, so
// define it per the ECMAScript spec before any libp2p module runs. peer.mjs imports this first.
if (typeof Promise.withResolvers !== 'function') {
  Object.defineProperty(Promise, 'withResolvers', {
    value: function withResolvers () {
      let resolve, reject
      const promise = new this((res, rej) => { resolve = res; reject = rej })
      return { promise, resolve, reject }
    },
    writable: true,
    configurable: true
  })
}
