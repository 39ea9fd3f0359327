// One host-compiled kernel as the stand-in's driver sees it: its extern "C" name, the kernel file,
// a trampoline that unpacks cuLaunchKernel's kernelParams by the kernel's own signature, the size
// and pointer-ness of each parameter (for cuFuncGetParamInfo and the pointer checks), the
// __launch_bounds__ maximum (0 = none) and this OS thread's dynamic shared memory.
#pragma once
#include <stddef.h>

struct KernelEntry {
    const char* name;
    const char* file;
    void (*call)(void** args);
    unsigned nparams;
    const unsigned* param_sizes;
    const unsigned char* param_is_pointer;
    unsigned max_threads;
    void* (*dyn_smem)();
};

// The largest dynamic shared memory a block may opt into on sm_90 (227 KB).
#define MOOD_SIM_DYN_SMEM_MAX 232448
