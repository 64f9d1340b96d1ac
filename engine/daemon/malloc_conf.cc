// cairnd's allocator: jemalloc, linked in place of glibc's malloc (for
// librados and librbd as well), set up by the malloc_conf string it reads
// as the process starts. The MALLOC_CONF environment variable overrides
// any of it. docs/PERFORMANCE.md ("Where each CPU second goes") has the
// figures behind each choice.
//
// - Freed pages are kept for reuse, handed back to the system over the
//   next two seconds (dirty_decay_ms; muzzy_decay_ms:0 skips the lazy-free
//   stage). Each 4 MiB read reply of librados's messenger thus lands in
//   pages already mapped: with glibc, which maps every buffer of that size
//   on its own, each took a zeroed page fault per 4 KiB, half the source's
//   CPU per GiB. Two seconds, not a quarter: over a 100 Mbit/s link a read
//   buffer waits a second for the link, and at 250 ms the source spent
//   5.76 CPU s on a sync it did in 3.13 at 2000 (bench/wan.py), for a few
//   MiB more at the peak of bench/many_volumes.py.
// - A background thread of jemalloc's does that handing back, so an idle
//   daemon, where nothing allocates, returns its memory too.
// - No cache per thread, two arenas: a thousand volumes run a thousand
//   threads, and a cache each (or an arena per quarter core) held 518 MiB
//   at the peak of bench/many_volumes.py, against 252 without.
extern "C" {
// The name and type jemalloc looks for.
const char* malloc_conf =
    "background_thread:true,dirty_decay_ms:2000,muzzy_decay_ms:0,tcache:false,narenas:2";
}
