// The few pieces of ONNX Runtime's C ABI that the SparseLinear custom op uses, declared by this
// project (not ORT's header: neither the onnxruntime wheel nor any package this project installs
// ships onnxruntime_c_api.h, see docs/kernels.md).
//
// Why this is stable: ORT's C API is a table of function pointers (OrtApi) obtained from
// OrtGetApiBase()->GetApi(version). Its members are only ever appended; a member's position never
// changes once a version has shipped (onnxruntime_c_api.cc enforces the size of every shipped
// version with static_asserts), and GetApi returns NULL for a version newer than the runtime's.
// So a member is reached here by its fixed slot index in that table, and every slot used below
// exists since the version noted beside it. OrtCustomOp (the struct a library fills) is versioned
// the same way: ORT reads only the members that exist in the version the op declares.
//
// Opaque handles stay opaque; enum-typed results and arguments are passed as int (the enums are
// int-sized on every ABI ORT supports).
#ifndef SR_ORT_ABI_H
#define SR_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>

#ifdef _WIN32
#define SR_ORT_CALL __stdcall
#else
#define SR_ORT_CALL
#endif

typedef struct OrtStatus OrtStatus;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;

// The API version this library asks for (CreateKernelV2/KernelComputeV2 exist from 16: ORT >= 1.16).
enum { SR_ORT_API_VERSION = 16 };

// OrtApiBase: two members, frozen (ORT asserts its size).
typedef struct SrOrtApiBase {
    const void*(SR_ORT_CALL* GetApi)(uint32_t version);
    const char*(SR_ORT_CALL* GetVersionString)(void);
} SrOrtApiBase;

// Slot indices in OrtApi (0-based, declaration order) and the API version that added each.
enum SrOrtSlot {
    SR_ORT_CreateStatus = 0,                     // v1: OrtStatus* (int code, const char* msg)
    SR_ORT_GetErrorMessage = 2,                  // v1: const char* (const OrtStatus*)
    SR_ORT_CreateCustomOpDomain = 26,            // v1: (const char* domain, OrtCustomOpDomain** out)
    SR_ORT_CustomOpDomain_Add = 27,              // v1: (OrtCustomOpDomain*, const OrtCustomOp*)
    SR_ORT_AddCustomOpDomain = 28,               // v1: (OrtSessionOptions*, OrtCustomOpDomain*)
    SR_ORT_GetTensorMutableData = 51,            // v1: (OrtValue*, void** out)
    SR_ORT_GetTensorElementType = 60,            // v1: (const OrtTensorTypeAndShapeInfo*, int* out)
    SR_ORT_GetDimensionsCount = 61,              // v1: (const OrtTensorTypeAndShapeInfo*, size_t* out)
    SR_ORT_GetDimensions = 62,                   // v1: (const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)
    SR_ORT_GetTensorTypeAndShape = 65,           // v1: (const OrtValue*, OrtTensorTypeAndShapeInfo** out)
    SR_ORT_KernelInfoGetAttribute_int64 = 86,    // v1: (const OrtKernelInfo*, const char* name, int64_t* out)
    SR_ORT_KernelContext_GetInput = 90,          // v1: (const OrtKernelContext*, size_t, const OrtValue** out)
    SR_ORT_KernelContext_GetOutput = 91,         // v1: (OrtKernelContext*, size_t, const int64_t* dims, size_t n, OrtValue** out)
    SR_ORT_ReleaseStatus = 93,                   // v1: void (OrtStatus*)
    SR_ORT_ReleaseTensorTypeAndShapeInfo = 99,   // v1: void (OrtTensorTypeAndShapeInfo*)
    SR_ORT_GetSessionConfigEntry = 238,          // v14: (const OrtSessionOptions*, const char* key, char* value, size_t* size)
    SR_ORT_KernelContext_ParallelFor = 274,      // v17: (const OrtKernelContext*, void (*fn)(void*, size_t),
                                                 //       size_t total, size_t num_batch, void* usr_data)
};
enum { SR_ORT_API_VERSION_POOL = 17 };  // KernelContext_ParallelFor: run on ORT's intra-op pool

// Values of ORT's enums used here.
enum { SR_ORT_FAIL = 1, SR_ORT_INVALID_ARGUMENT = 2 };                       // OrtErrorCode
enum { SR_ORT_FLOAT = 1, SR_ORT_INT16 = 5, SR_ORT_INT32 = 6, SR_ORT_INT64 = 7 };  // ONNXTensorElementDataType
enum { SR_ORT_IO_REQUIRED = 0 };                                            // OrtCustomOpInputOutputCharacteristic
enum { SR_ORT_MEM_DEFAULT = 0 };                                            // OrtMemType (CPU, default)

// OrtCustomOp up to the members of version 16 (ORT reads no further for an op of version 16).
typedef struct SrOrtCustomOp SrOrtCustomOp;
struct SrOrtCustomOp {
    uint32_t version;                                                                            // v1
    void*(SR_ORT_CALL* CreateKernel)(const SrOrtCustomOp*, const void* api, const OrtKernelInfo*);  // v1
    const char*(SR_ORT_CALL* GetName)(const SrOrtCustomOp*);                                     // v1
    const char*(SR_ORT_CALL* GetExecutionProviderType)(const SrOrtCustomOp*);                    // v1
    int(SR_ORT_CALL* GetInputType)(const SrOrtCustomOp*, size_t);                                // v1
    size_t(SR_ORT_CALL* GetInputTypeCount)(const SrOrtCustomOp*);                                // v1
    int(SR_ORT_CALL* GetOutputType)(const SrOrtCustomOp*, size_t);                               // v1
    size_t(SR_ORT_CALL* GetOutputTypeCount)(const SrOrtCustomOp*);                               // v1
    void(SR_ORT_CALL* KernelCompute)(void* kernel, OrtKernelContext*);                           // v1
    void(SR_ORT_CALL* KernelDestroy)(void* kernel);                                              // v1
    int(SR_ORT_CALL* GetInputCharacteristic)(const SrOrtCustomOp*, size_t);                      // v8
    int(SR_ORT_CALL* GetOutputCharacteristic)(const SrOrtCustomOp*, size_t);                     // v8
    int(SR_ORT_CALL* GetInputMemoryType)(const SrOrtCustomOp*, size_t);                          // v13
    int(SR_ORT_CALL* GetVariadicInputMinArity)(const SrOrtCustomOp*);                            // v14
    int(SR_ORT_CALL* GetVariadicInputHomogeneity)(const SrOrtCustomOp*);                         // v14
    int(SR_ORT_CALL* GetVariadicOutputMinArity)(const SrOrtCustomOp*);                           // v14
    int(SR_ORT_CALL* GetVariadicOutputHomogeneity)(const SrOrtCustomOp*);                        // v14
    OrtStatus*(SR_ORT_CALL* CreateKernelV2)(const SrOrtCustomOp*, const void* api, const OrtKernelInfo*,
                                            void** kernel);                                      // v16
    OrtStatus*(SR_ORT_CALL* KernelComputeV2)(void* kernel, OrtKernelContext*);                   // v16
};

#endif  // SR_ORT_ABI_H
