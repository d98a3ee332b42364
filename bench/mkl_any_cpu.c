/*
 * The MKL linked into torch's CPU wheels picks its matrix-product kernels by CPU vendor: on an AMD CPU
 * it takes a generic path although the CPU has AVX-512 (measured on a 2-core AMD EPYC here: 85-92
 * GFLOPS for one fp32 linear on one thread, against 194 with this library preloaded; oneDNN's kernels
 * reach 198 on the same CPU). Preloaded (LD_PRELOAD), this one function answers MKL's vendor question
 * with "yes", and MKL then chooses its kernels from the CPU's instruction sets, as it does on Intel
 * CPUs. It changes which kernels run, so results can differ from the generic path in the last bits;
 * they are the kernels the same wheel runs on an Intel CPU with the same instruction sets.
 * `make demo` builds it into the virtual environment and bench/demo.py preloads it when it exists.
 */
int mkl_serv_intel_cpu_true(void) { return 1; }
