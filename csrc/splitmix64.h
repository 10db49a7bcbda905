// splitmix64 (Steele, Lea, Flood 2014): the generator of fastjepa's C++ mask samplers
// (sampler.cpp, sampler3d.cpp). 64-bit state, one add and a mixing function per draw.
#pragma once

#include <cstdint>

namespace fastjepa {

struct SplitMix64 {
  uint64_t state;
  explicit SplitMix64(uint64_t s) : state(s) {}
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  // Uniform on [0, 1) in steps of 2^-24, the values torch.rand's float32 draw takes.
  double uniform() { return static_cast<double>(next() >> 40) * (1.0 / 16777216.0); }
  // Uniform integer in [0, n), n >= 1, unbiased (Lemire's multiply, reject the short remainder).
  int64_t below(uint64_t n) {
    unsigned __int128 m = static_cast<unsigned __int128>(next()) * n;
    uint64_t low = static_cast<uint64_t>(m);
    if (low < n) {
      const uint64_t threshold = (0 - n) % n;
      while (low < threshold) {
        m = static_cast<unsigned __int128>(next()) * n;
        low = static_cast<uint64_t>(m);
      }
    }
    return static_cast<int64_t>(m >> 64);
  }
};

}  // namespace fastjepa
