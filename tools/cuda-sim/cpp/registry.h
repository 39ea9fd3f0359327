// Helpers for the registry files build.rs generates, one per kernel file: the kernel's signature
// is deduced from its function type, so nothing is written by hand per kernel.
#pragma once
#include <type_traits>
#include <utility>

#include "kernel_table.h"
#include "mood_sim.h"

template <typename... A>
struct MoodSimSig {
    template <void (*F)(A...), size_t... I>
    static void call_with(void** a, std::index_sequence<I...>) {
        F(*static_cast<A*>(a[I])...);
    }
    template <void (*F)(A...)>
    static void call(void** a) {
        call_with<F>(a, std::index_sequence_for<A...>{});
    }
    static constexpr unsigned n = sizeof...(A);
    static constexpr unsigned sizes[sizeof...(A) + 1] = {(unsigned)sizeof(A)..., 0};
    static constexpr unsigned char pointers[sizeof...(A) + 1] = {
        (unsigned char)std::is_pointer<A>::value..., 0};
};

template <typename... A>
MoodSimSig<A...> mood_sim_sig(void (*)(A...));

#define MOOD_SIM_ENTRY(NAME, BOUND)                                                     \
    {#NAME, MOOD_SIM_FILE, &decltype(mood_sim_sig(&NAME))::template call<&NAME>,         \
     decltype(mood_sim_sig(&NAME))::n, decltype(mood_sim_sig(&NAME))::sizes,             \
     decltype(mood_sim_sig(&NAME))::pointers, (unsigned)(BOUND), MOOD_SIM_DYN}
