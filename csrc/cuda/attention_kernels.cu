// The CUDA kernels of block-causal attention and their launches (launch.h): one __global__
// wrapper per thread-block program of attention_blocks.cuh, instantiated for __half and
// __nv_bfloat16 x DP in {32, 64, 96, 128}. Only c10 headers here, no ATen (see launch.h).
//
// Legend: H = B * N heads; Sq queries; Sk keys; DP the compiled head dim d is padded to.
//
// Grids: forward, heads x query tiles, with the last query tiles (which see the most keys)
// started first; backward, heads x key tiles (the first key tiles, seen by the most queries,
// start first).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "attention_blocks.cuh"

namespace nbp_mega::cuda {
namespace {

template <class T, int DP>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ForwardArgs<T> args) {
  extern __shared__ __align__(128) char smem[];
  forward_block<T, DP>(args, blockIdx.x, gridDim.y - 1 - blockIdx.y, smem);
}

template <class T, int DP>
__global__ void __launch_bounds__(kThreads) backward_kernel(const BackwardArgs<T> args) {
  extern __shared__ __align__(128) char smem[];
  backward_block<T, DP>(args, blockIdx.x, blockIdx.y, smem);
}

// Launches kernel(args) on a heads x tiles grid with `bytes` of dynamic shared memory.
template <class Kernel, class Args>
void launch(const char* op, Kernel kernel, const Args& args, int64_t tiles, size_t bytes) {
  int device = 0, max_bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&max_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= static_cast<size_t>(max_bytes), op, ": the kernel needs ", bytes,
              " bytes of shared memory per block; GPU ", device, " allows ", max_bytes);
  TORCH_CHECK_VALUE(args.heads <= INT32_MAX && tiles <= 65535, op, ": ", args.heads,
                    " heads (B * N) x ", tiles, " tiles exceed the CUDA grid (2^31 - 1 x 65535)");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  const dim3 grid(static_cast<unsigned>(args.heads), static_cast<unsigned>(tiles));
  kernel<<<grid, kThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <class T>
void launch_forward(const ForwardArgs<T>& args) {
  const char* op = "block_causal_attention (CUDA)";
  const int64_t tiles = ceil_div(args.sched.sq, kFwdBQ);
  const bool compiled = with_head_dim(args.d, [&](auto dp) {
    constexpr int DP = decltype(dp)::value;
    launch(op, forward_kernel<T, DP>, args, tiles, ForwardTiles<T, DP>(0).bytes);
  });
  TORCH_CHECK_VALUE(compiled, op, ": the CUDA kernels take head dim <= 128, got ", args.d);
}

template <class T>
void launch_backward(const BackwardArgs<T>& args) {
  const char* op = "block_causal_attention_backward (CUDA)";
  const int64_t tiles = ceil_div(args.sched.sk, kBwdBK);
  const bool compiled = with_head_dim(args.d, [&](auto dp) {
    constexpr int DP = decltype(dp)::value;
    launch(op, backward_kernel<T, DP>, args, tiles, BackwardTiles<T, DP>(0).bytes);
  });
  TORCH_CHECK_VALUE(compiled, op, ": the CUDA kernels take head dim <= 128, got ", args.d);
}

template void launch_forward<__half>(const ForwardArgs<__half>&);
template void launch_forward<__nv_bfloat16>(const ForwardArgs<__nv_bfloat16>&);
template void launch_backward<__half>(const BackwardArgs<__half>&);
template void launch_backward<__nv_bfloat16>(const BackwardArgs<__nv_bfloat16>&);

}  // namespace nbp_mega::cuda
