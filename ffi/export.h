// Visibility of the symbols Python loads from libeaas_ffi.so. The library is
// built with hidden visibility by default; only names marked EAAS_FFI_EXPORT
// (the FFI handlers and the C API called through ctypes) are exported.
#ifndef EAAS_FFI_EXPORT_H_
#define EAAS_FFI_EXPORT_H_

#if defined(_WIN32)
#define EAAS_FFI_EXPORT __declspec(dllexport)
#else
#define EAAS_FFI_EXPORT __attribute__((visibility("default")))
#endif

#endif  // EAAS_FFI_EXPORT_H_
