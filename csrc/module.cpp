// The Python module fastjepa._C (plain CPython API, no pybind11, to keep the build short).
// Importing it loads the shared library, whose static initialisers register the ops
// under torch.ops.fastjepa. Attributes: WITH_CUDA (bool), build_info() (dict of str).

#include <Python.h>

#include <string>

#include "fastjepa.h"

namespace {

PyObject* py_build_info(PyObject*, PyObject*) {
  const std::string info = fastjepa::build_info();  // "key=value; key=value"
  PyObject* d = PyDict_New();
  size_t pos = 0;
  while (pos < info.size()) {
    size_t end = info.find("; ", pos);
    if (end == std::string::npos) end = info.size();
    const std::string item = info.substr(pos, end - pos);
    const size_t eq = item.find('=');
    PyObject* v = PyUnicode_FromString(item.substr(eq + 1).c_str());
    PyDict_SetItemString(d, item.substr(0, eq).c_str(), v);
    Py_DECREF(v);
    pos = end + 2;
  }
  return d;
}

PyMethodDef methods[] = {
    {"build_info", py_build_info, METH_NOARGS, "Compiler, torch, OpenMP and CUDA the extension was built with."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastjepa C++/CUDA extension (ops under torch.ops.fastjepa).", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
#ifdef WITH_CUDA
  PyModule_AddObject(m, "WITH_CUDA", Py_NewRef(Py_True));
#else
  PyModule_AddObject(m, "WITH_CUDA", Py_NewRef(Py_False));
#endif
  return m;
}
